"""Host -> device copies that never stall the host: small host values (lengths, slots, ids,
sampling settings) go through pinned memory with one non_blocking copy.

A plain `dst.copy_(torch.tensor(values))` from pageable memory is a cudaMemcpy that torch follows
with a stream synchronize: each costs a driver round trip and waits for every step in flight (the
decode loop runs one step ahead of the host). Pinned blocks come from torch's caching host
allocator, which keeps a block until the copy that reads it has run, so a fresh one per call is
safe to drop at once.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .kernels._utils import is_tracing


def host_tensor(values: Sequence, dtype: torch.dtype, device) -> torch.Tensor:
    """`values` as a host tensor to copy to `device`: pinned when `device` is a real GPU."""
    host = torch.tensor(list(values), dtype=dtype)
    if torch.device(device).type == "cuda" and torch.cuda.is_available() and not is_tracing():
        return host.pin_memory()
    return host


def to_device(values: Sequence, dtype: torch.dtype, device) -> torch.Tensor:
    """A new device tensor holding `values` (one non_blocking copy from pinned memory on a GPU)."""
    return host_tensor(values, dtype, device).to(device, non_blocking=True)


def fill_from_host(dst: torch.Tensor, values: Sequence) -> None:
    """dst[:] = values, in dst's dtype, without a host sync (dst keeps its address: graph inputs)."""
    dst.copy_(host_tensor(values, dst.dtype, dst.device), non_blocking=True)


# CUDA errors after which the context is unusable for the rest of the process (a kernel's
# device-side assert, an illegal address, a launch failure): torch raises them as
# torch.AcceleratorError (2.8+) or as a RuntimeError carrying the driver's message.
_FATAL_MARKERS = ("device-side assert", "illegal memory access", "illegal address",
                  "unspecified launch failure", "CUDA error: an illegal instruction",
                  "misaligned address", "uncorrectable ECC error")


def device_failed(error: BaseException) -> bool:
    """Whether `error` leaves the GPU context unusable, so no further request can succeed in this
    process (a server should report itself failed and be restarted; see serving/)."""
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(error, accel):
        return True
    if isinstance(error, RuntimeError):
        msg = str(error)
        return any(m in msg for m in _FATAL_MARKERS)
    return False
