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

CUDA tensors run the Triton launcher (``<op>.py``, imported lazily on first use); anything else runs
the torch oracle in ``reference.py`` (the CPU fallback). ``DREAMLLM_KERNELS=triton`` forces Triton
(interpreter-mode tests on CPU tensors), ``DREAMLLM_KERNELS=ref`` forces the references; ``auto``
(default) dispatches on device. The variable is read at import and by ``set_backend(None)``;
``set_backend(name)`` overrides it from code.

Importing this package imports only torch and ``reference.py``.
"""
from __future__ import annotations

import importlib
import os
import sys
import types

from . import reference as _ref
from .reference import rope_cos_sin_ref as rope_cos_sin

__all__ = ["append_attention", "decode_attention", "dream_projection", "rmsnorm", "silu_and_mul",
           "rope_cos_sin", "set_backend", "backend", "exponential_sample"]

_BACKENDS = ("auto", "triton", "ref")
_backend = ["auto"]  # one cell, read by every call: os.environ.get measured 2 us per call here


def _env_backend() -> str:
    name = os.environ.get("DREAMLLM_KERNELS", "auto").lower()
    assert name in _BACKENDS, f"DREAMLLM_KERNELS must be one of {_BACKENDS}, got {name!r}"
    return name


def set_backend(name: str | None) -> None:
    """Force 'triton' or 'ref' for every op, 'auto' to dispatch on device, None to (re-)read the
    DREAMLLM_KERNELS environment variable (read once at import otherwise)."""
    assert name is None or name in _BACKENDS, f"backend must be one of {_BACKENDS} or None, got {name!r}"
    _backend[0] = _env_backend() if name is None else name


def backend() -> str:
    return _backend[0] or _env_backend()  # None: the env value was invalid at import; raise now


def _use_triton(t) -> bool:
    name = _backend[0] or _env_backend()
    return t.is_cuda if name == "auto" else name == "triton"


try:
    set_backend(None)
except AssertionError:  # a bad DREAMLLM_KERNELS must not break `import`: the first op call reports it
    _backend[0] = None

_launchers: dict = {}


def _launcher(op: str, module: str | None = None):
    fn = _launchers.get(op)
    if fn is None:  # first use: import Triton and the kernel file
        fn = getattr(importlib.import_module(f".{module or op}", __name__), op)
        _launchers[op] = fn
    return fn


def append_attention(q, k, v, k_cache, v_cache, cu_seqlens_q, cache_lens, slot_ids, cos, sin,
                     max_seqlen_q, sm_scale=None, out=None):
    fn = _launcher("append_attention") if _use_triton(q) else _ref.append_attention_ref
    return fn(q, k, v, k_cache, v_cache, cu_seqlens_q, cache_lens, slot_ids, cos, sin, max_seqlen_q,
              sm_scale=sm_scale, out=out)


def decode_attention(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, sm_scale=None,
                     num_splits=None, out=None, config=None):
    fn = _launcher("decode_attention") if _use_triton(q) else _ref.decode_attention_ref
    return fn(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, sm_scale=sm_scale,
              num_splits=num_splits, out=out, config=config)


def dream_projection(hidden, rows, norm_weight, proj_weight, eps, out=None):
    fn = _launcher("dream_projection") if _use_triton(hidden) else _ref.dream_projection_ref
    return fn(hidden, rows, norm_weight, proj_weight, eps, out=out)


def rmsnorm(x, weight, eps, residual=None, out=None, residual_out=None):
    fn = _launcher("rmsnorm") if _use_triton(x) else _ref.rmsnorm_ref
    return fn(x, weight, eps, residual=residual, out=out, residual_out=residual_out)


def silu_and_mul(gate_up, out=None):
    fn = _launcher("silu_and_mul", module="swiglu") if _use_triton(gate_up) else _ref.silu_and_mul_ref
    return fn(gate_up, out=out)


def exponential_sample(probs, seeds, positions, out=None, noise_out=None):
    fn = _launcher("exponential_sample", module="sampling") if _use_triton(probs) else _ref.exponential_sample_ref
    return fn(probs, seeds, positions, out=out, noise_out=noise_out)


for _f, _r in ((append_attention, _ref.append_attention_ref), (decode_attention, _ref.decode_attention_ref),
               (dream_projection, _ref.dream_projection_ref), (rmsnorm, _ref.rmsnorm_ref),
               (silu_and_mul, _ref.silu_and_mul_ref), (exponential_sample, _ref.exponential_sample_ref)):
    _f.__doc__ = (_r.__doc__ or "") + "\n    Dispatch: Triton launcher for CUDA tensors, this oracle otherwise."

_PUBLIC = {name: globals()[name] for name in __all__}


class _KernelsPackage(types.ModuleType):
    """Keeps the public function names bound to the dispatchers.

    Kernel files share their op's name (``append_attention.py`` defines ``append_attention``), and
    importing a submodule sets it as an attribute of its package, which would shadow the dispatcher.
    Submodules stay reachable through ``sys.modules`` and ``from ...kernels.<op> import <op>``.
    """

    def __setattr__(self, name, value):
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _KernelsPackage
