"""The dispatch front of dreamllm_fast.kernels: each public op runs its Triton launcher on CUDA
tensors (imported on first use) and its torch oracle from ``reference.py`` otherwise. The package
``__init__`` re-exports the public names; see its docstring for the backend switch.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import reference as _ref
from ._utils import is_tracing as _is_tracing
from .reference import rope_cos_sin_ref as rope_cos_sin

__all__ = ["append_attention", "decode_attention", "dream_projection", "rmsnorm", "silu_and_mul",
           "rope_cos_sin", "set_backend", "backend", "exponential_sample", "quant_linear",
           "group_norm"]

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
        fn = getattr(importlib.import_module(f".{module or op}", __package__), op)
        _launchers[op] = fn
    return fn


def _on_device(t, fn, *args, **kwargs):
    """Run a Triton launcher on ``t``'s GPU. Triton launches on the thread's CURRENT device, not on
    its tensors' (torch ops carry a device guard, Triton's launcher does not): an engine on cuda:1,
    or a server's worker thread (current device 0), would otherwise launch device-1 pointers on
    device 0. Costs two C calls when the devices already agree."""
    idx = t.get_device()
    if idx < 0 or _is_tracing(t) or idx == torch.cuda.current_device():  # (fake tensors: no driver)
        return fn(*args, **kwargs)
    with torch.cuda.device(idx):
        return fn(*args, **kwargs)


def append_attention(q, k, v, k_cache, v_cache, cu_seqlens_q, cache_lens, slot_ids, cos, sin,
                     max_seqlen_q, sm_scale=None, out=None):
    args = (q, k, v, k_cache, v_cache, cu_seqlens_q, cache_lens, slot_ids, cos, sin, max_seqlen_q)
    if _use_triton(q):
        return _on_device(q, _launcher("append_attention"), *args, sm_scale=sm_scale, out=out)
    return _ref.append_attention_ref(*args, sm_scale=sm_scale, out=out)


def decode_attention(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, sm_scale=None,
                     num_splits=None, out=None, config=None):
    args = (q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin)
    kw = dict(sm_scale=sm_scale, num_splits=num_splits, out=out, config=config)
    if _use_triton(q):
        return _on_device(q, _launcher("decode_attention"), *args, **kw)
    return _ref.decode_attention_ref(*args, **kw)


def dream_projection(hidden, rows, norm_weight, proj_weight, eps, out=None):
    args = (hidden, rows, norm_weight, proj_weight, eps)
    if _use_triton(hidden):
        return _on_device(hidden, _launcher("dream_projection"), *args, out=out)
    return _ref.dream_projection_ref(*args, out=out)


def rmsnorm(x, weight, eps, residual=None, out=None, residual_out=None):
    kw = dict(residual=residual, out=out, residual_out=residual_out)
    if _use_triton(x):
        return _on_device(x, _launcher("rmsnorm"), x, weight, eps, **kw)
    return _ref.rmsnorm_ref(x, weight, eps, **kw)


def silu_and_mul(gate_up, out=None):
    if _use_triton(gate_up):
        return _on_device(gate_up, _launcher("silu_and_mul", module="swiglu"), gate_up, out=out)
    return _ref.silu_and_mul_ref(gate_up, out=out)


def exponential_sample(probs, seeds, positions, out=None, noise_out=None):
    if _use_triton(probs):
        return _on_device(probs, _launcher("exponential_sample", module="sampling"), probs, seeds, positions,
                          out=out, noise_out=noise_out)
    return _ref.exponential_sample_ref(probs, seeds, positions, out=out, noise_out=noise_out)


def quant_linear(x, qweight, scale, out=None, split_k=None):
    if _use_triton(x):
        return _on_device(x, _launcher("quant_linear"), x, qweight, scale, out=out, split_k=split_k)
    return _ref.quant_linear_ref(x, qweight, scale, out=out, split_k=split_k)


def group_norm(x, weight, bias, num_groups, eps, silu=False, out=None):
    if _use_triton(x):
        return _on_device(x, _launcher("group_norm"), x, weight, bias, num_groups, eps, silu=silu,
                          out=out)
    return _ref.group_norm_ref(x, weight, bias, num_groups, eps, silu=silu, out=out)


for _f, _r in ((append_attention, _ref.append_attention_ref), (decode_attention, _ref.decode_attention_ref),
               (dream_projection, _ref.dream_projection_ref), (rmsnorm, _ref.rmsnorm_ref),
               (silu_and_mul, _ref.silu_and_mul_ref), (exponential_sample, _ref.exponential_sample_ref),
               (quant_linear, _ref.quant_linear_ref),
               (group_norm, _ref.group_norm_ref)):
    _f.__doc__ = (_r.__doc__ or "") + "\n    Dispatch: Triton launcher for CUDA tensors, this oracle otherwise."
