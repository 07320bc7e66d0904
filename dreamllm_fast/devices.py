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
