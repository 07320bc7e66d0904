"""Small launcher helpers shared by the kernel files (no Triton import here)."""
from __future__ import annotations

import os

import torch


def is_interpret() -> bool:
    """True when Triton runs in interpreter mode (CPU tests): tiny blocks, fp32 upcasts."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


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


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on device (132 on H100 SXM); 4 for CPU/interpreter runs."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def register_triton_op(name: str, mutates_args: tuple):
    """Decorator: register ``fn`` as the custom op ``dreamllm::<name>`` via ``torch.library.triton_op``.

    The launch bodies call their kernels through ``torch.library.wrap_triton``, so torch.compile
    sees the Triton kernels (and the declared mutated buffers) inside the op. Launchers call the
    registered op only while compiling (``torch.compiler.is_compiling()``) and the plain function
    in eager mode: custom-op dispatch costs tens of microseconds per call, which adds up over 32
    layers of eager prefill, and captured CUDA graphs never see either. In interpreter mode the op
    works eagerly, but torch.compile cannot trace it (the interpreter needs real data pointers,
    FakeTensors have none), so compile-path tests are CUDA-only.
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


def launch(fn, *args, **kwargs):
    """Call the registered op while torch.compile traces, the plain launch function otherwise."""
    if torch.compiler.is_compiling():
        return fn.op(*args, **kwargs)
    return fn(*args, **kwargs)
