"""Small launcher helpers shared by the kernel files (no Triton import here).

The eager hot path of every launcher is: precondition checks, one dict lookup of a launch plan
(grid rules, constexprs, warps, stages, scratch buffers) computed once per shape key, then the raw
``kernel[grid](...)``. Host-side integer helpers are plain Python: ``triton.cdiv`` on the host goes
through Triton's constexpr-function wrapper and measured 3.4 us per call here (2-core Xeon, triton
3.8) against ~0.1 us for ``-(-a // b)``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch._C import _TorchDispatchModeKey as _ModeKey
from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor


def is_interpret() -> bool:
    """True when Triton runs in interpreter mode (CPU tests): tiny blocks, fp32 upcasts."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    """Largest power of two <= n (1 for n < 1)."""
    return 1 << max(0, int(n).bit_length() - 1)


def warps_for_block(block: int) -> int:
    """Liger ``calculate_settings``: more warps for wider rows."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


_SM_COUNT: dict = {}  # plain dict, not lru_cache: torch.compile traces dict lookups without a break
_STANDIN_SMS = {"count": 4}  # SMs reported for non-CUDA devices (targets.py sets the target's count)
FAKE_CUDA_SMS = 132  # fake CUDA tensors on a machine without a driver: plan for an H100 SXM


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on device (132 on H100 SXM); for non-CUDA tensors 4 (interpreter
    runs) or the count `set_standin_sm_count` gives (compile checks on meta tensors); for fake
    CUDA tensors without a driver, an H100's."""
    if device.type != "cuda":
        return _STANDIN_SMS["count"]
    index = device.index  # tensors always carry one; None only for a bare torch.device("cuda")
    n = _SM_COUNT.get(index)
    if n is None:
        if torch.cuda.is_available():
            n = torch.cuda.get_device_properties(
                index if index is not None else torch.cuda.current_device()).multi_processor_count
        else:
            n = FAKE_CUDA_SMS
        if index is not None:
            _SM_COUNT[index] = n
    return n


def set_standin_sm_count(count: int) -> None:
    """SM count the launchers assume for non-CUDA tensors (default 4); clears the launch plans."""
    _STANDIN_SMS["count"] = int(count)
    clear_plans()


_PLAN_CACHES: list = []


def plan_cache() -> dict:
    """A per-launcher dict {shape key: launch plan}, registered so `clear_plans` can empty it.

    Plans are filled by eager calls only (never while tracing: keys of traced calls may hold
    symbolic sizes, and fake buffers must not be kept); a key holds only hashable host values.
    """
    cache: dict = {}
    _PLAN_CACHES.append(cache)
    return cache


def clear_plans() -> None:
    """Forget every cached launch plan (and the decode scratch buffers they hold)."""
    for cache in _PLAN_CACHES:
        cache.clear()


def register_triton_op(name: str, mutates_args: tuple):
    """Decorator: register ``fn`` as the custom op ``dreamllm::<name>`` via ``torch.library.triton_op``.

    The decorated function is the traced launch body: it is reached only through ``fn.op`` while
    torch.compile/export traces or a fake/functional/proxy mode is active (see `is_tracing`), and
    it launches each kernel through ``torch.library.wrap_triton`` so the tracer sees the kernels and
    the declared mutated buffers. Eager calls never come here: each launcher launches the raw
    kernel itself. Through ``wrap_triton`` an eager call measured 0.19 to 1.04 ms of host time per
    op on an H100 (torch 2.11, triton 3.6; 0.92 ms of an rmsnorm call inside
    ``triton_kernel_wrapper_mutation``: pytree walks, ``inspect.signature``, the dispatcher)
    against 1.3 to 11 us of GPU time.

    In interpreter mode the op also works eagerly, but torch.compile cannot trace it (the
    interpreter needs real data pointers, FakeTensors have none), so compile-path tests are CUDA-only.
    """

    def deco(fn):
        try:
            from torch.library import triton_op
        except ImportError:  # older torch: eager only
            fn.op = fn
            return fn
        fn.op = triton_op(f"dreamllm::{name}", mutates_args=mutates_args)(fn)
        return fn

    return deco


def wrap(kernel):
    """``torch.library.wrap_triton(kernel)``, looked up at call time (tests count the calls)."""
    return torch.library.wrap_triton(kernel)


_TRACING_MODES = (_ModeKey.FAKE, _ModeKey.FUNCTIONAL, _ModeKey.PROXY)


def is_tracing(t: Optional[torch.Tensor] = None) -> bool:
    """True while torch.compile/export traces, a fake/functional/proxy mode is active, or ``t`` is a
    FakeTensor: Triton must then be reached through the registered op and ``wrap_triton``.

    Cost on the eager path: about 0.5 us here (two C calls and a type check).
    """
    if torch.compiler.is_compiling():
        return True
    if torch._C._len_torch_dispatch_stack() and any(
            torch._C._get_dispatch_mode(k) is not None for k in _TRACING_MODES):
        return True
    return t is not None and type(t) is not torch.Tensor and isinstance(t, _FakeTensor)
