"""Triton kernels for the DreamLLM hot path (installed as dreamllm_fast.kernels).

Public ops, dispatched on the device of their first tensor argument:

    append_attention(q, k, v, k_cache, v_cache, cu_seqlens_q, cache_lens, slot_ids, cos, sin,
                     max_seqlen_q, sm_scale=None, out=None) -> out
    decode_attention(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, sm_scale=None,
                     num_splits=None, out=None, config=None) -> out
    dream_projection(hidden, rows, norm_weight, proj_weight, eps, out=None) -> out
    rmsnorm(x, weight, eps, residual=None, out=None, residual_out=None) -> normed | (normed, h)
    silu_and_mul(gate_up, out=None) -> out
    rope_cos_sin(max_pos, head_dim, theta=10000.0, device=None) -> (cos, sin)
    exponential_sample(probs, seeds, positions, out=None, noise_out=None) -> ids
    quant_linear(x, qweight, scale, out=None, split_k=None) -> out   (int8/fp8 weight-only linear)
    group_norm(x, weight, bias, num_groups, eps, silu=False, out=None) -> out

CUDA tensors run the Triton launcher (``<op>.py``, imported lazily on first use); anything else runs
the torch oracle in ``reference.py`` (the CPU fallback). ``DREAMLLM_KERNELS=triton`` forces Triton
(interpreter-mode tests on CPU tensors), ``DREAMLLM_KERNELS=ref`` forces the references; ``auto``
(default) dispatches on device. The variable is read at import and by ``set_backend(None)``;
``set_backend(name)`` overrides it from code.

Triton launches run on their tensors' GPU whatever the thread's current device (`_on_device`).

Importing this package imports only torch, ``reference.py``, ``_utils.py`` and ``dispatch.py``
(no Triton).

The name ``kernels``. This folder sits at the top of the repository but installs only as
``dreamllm_fast.kernels``: the top-level name ``kernels`` belongs to the PyPI distribution of that
name, which transformers and diffusers import. Any ``python -m ...`` or ``python -c ...`` run from
the repository root puts the root first on ``sys.path``, where ``import kernels`` would find this
folder. So when this file runs under the name ``kernels`` it hands the name to the distribution
(the same lookup with the root left out) and defines nothing of its own; without the distribution,
the import fails as it would anywhere else.
"""
if __name__ == "kernels":  # imported by the top-level name: see "The name kernels" above
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec
    from os import path as _path

    _root = _path.dirname(_path.dirname(_path.realpath(__file__)))
    _spec = _PathFinder.find_spec(__name__, [p for p in _sys.path if _path.realpath(p or ".") != _root])
    if _spec is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' outside this checkout: its kernels/ folder is "
            "dreamllm_fast.kernels (`pip install kernels` provides the top-level name)", name=__name__)
    _library = _module_from_spec(_spec)
    _sys.modules[__name__] = _library  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_library)
else:
    import sys
    import types

    from .dispatch import (__all__, append_attention, backend, decode_attention,  # noqa: F401
                           dream_projection, exponential_sample, group_norm, quant_linear, rmsnorm,
                           rope_cos_sin, set_backend, silu_and_mul)

    _PUBLIC = {name: globals()[name] for name in __all__}

    class _KernelsPackage(types.ModuleType):
        """Keeps the public function names bound to the dispatchers.

        Kernel files share their op's name (``append_attention.py`` defines ``append_attention``),
        and importing a submodule sets it as an attribute of its package, which would shadow the
        dispatcher. Submodules stay reachable through ``sys.modules`` and
        ``from ...kernels.<op> import <op>``.
        """

        def __setattr__(self, name, value):
            if name in _PUBLIC and isinstance(value, types.ModuleType):
                return
            super().__setattr__(name, value)

    sys.modules[__name__].__class__ = _KernelsPackage
