"""`CudaGraphRunner`: captured decode steps at a few batch sizes (style.md §12; SGLang's runner).

The runner owns max-size static input buffers (embeddings, cache lengths, slot ids) and one captured
graph per capture size, all captured largest-first into one shared memory pool after two warm-up
runs each (the warm-ups compile/autotune the Triton kernels and allocate the decode kernel's cached
split-KV scratch, so the graph sees no first-call work). A call:

    if runner.can_run(bs):
        padded = runner.prepare(embeds, cache_lens, slot_ids)  # copies into the static buffers
        logits = runner.replay(bs, padded)                     # view of the graph's output

`prepare` pads to the next capture size (bisect); padding rows carry zero embeddings, length 0 and
the cache's scratch slot, so they write only scratch K/V and never touch a live sequence. Positions
are device tensors filled with `fill_` (a kernel argument, not a host->device copy), so a replay
needs no host sync. The output is a view into graph memory: callers clone it before the next replay.
"""
from __future__ import annotations

import bisect
import time
from typing import Callable, Sequence

import torch

from .graphs import CudaGraphs

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

CAPTURE_REMEDIES = (
    "remedies: (1) pass EngineConfig(use_cuda_graphs=False) to decode eagerly (same numbers, more "
    "launch overhead); (2) keep host syncs out of the decode step (.item(), .tolist(), print, "
    "data-dependent shapes); DREAMLLM_KERNELS=ref selects the torch references, which loop on the "
    "host and cannot be captured: unset it on CUDA; (3) free GPU memory or lower "
    "EngineConfig.cuda_graph_batch_sizes / max_batch (each size keeps its activations in the pool)"
)


class CudaGraphRunner:
    """Captured `step_fn(embeds [B, H], cache_lens [B] int32, slot_ids [B] int32) -> [B, V]`."""

    def __init__(self, step_fn: StepFn, hidden_size: int, capture_sizes: Sequence[int],
                 scratch_slot: int, device, dtype, debug: bool = False, backend=None):
        self.step_fn = step_fn
        self.backend = backend  # engine.graphs backend (None: real CUDA graphs); shares its pool
        self.sizes = sorted({int(s) for s in capture_sizes})
        assert self.sizes and self.sizes[0] >= 1, f"capture sizes must be >= 1, got {capture_sizes}"
        self.max_bs = self.sizes[-1]
        self.scratch_slot = scratch_slot
        self.device = torch.device(device)
        self.debug = debug
        # static inputs at the largest size; graphs of smaller sizes read leading slices
        self.embeds = torch.zeros(self.max_bs, hidden_size, device=self.device, dtype=dtype)
        self.cache_lens = torch.zeros(self.max_bs, device=self.device, dtype=torch.int32)
        self.slot_ids = torch.full((self.max_bs,), scratch_slot, device=self.device, dtype=torch.int32)
        self.graphs: dict[int, object] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._ptrs = None
        self.capture_seconds = 0.0

    def _args(self, bs: int):
        return self.embeds[:bs], self.cache_lens[:bs], self.slot_ids[:bs]

    @torch.no_grad()
    def capture(self) -> None:
        t0 = time.perf_counter()
        if self.backend is None:
            self.backend = CudaGraphs(self.device)
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its pool blocks
            self.embeds.zero_()
            self.cache_lens.zero_()
            self.slot_ids.fill_(self.scratch_slot)  # warm-ups and capture write scratch K/V only

            def step(bs=bs):
                return self.step_fn(*self._args(bs))

            try:
                self.backend.warmup(step)  # compile + autotune + scratch allocation happen here
                g, out = self.backend.capture(step)
            except Exception as e:
                raise RuntimeError(
                    f"CUDA graph capture of the decode step failed at batch size {bs} "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    f"{CAPTURE_REMEDIES}") from e
            self.graphs[bs] = g
            self.outputs[bs] = out
        self.backend.synchronize()
        if self.debug:  # (fake tensors have no data pointers: read them only when asked)
            self._ptrs = (self.embeds.data_ptr(), self.cache_lens.data_ptr(), self.slot_ids.data_ptr())
        self.capture_seconds = time.perf_counter() - t0

    def can_run(self, bs: int) -> bool:
        return bool(self.graphs) and 1 <= bs <= self.max_bs

    def prepare(self, embeds: torch.Tensor, cache_lens: Sequence[int], slot_ids: Sequence[int]) -> int:
        """Copy one step's inputs into the static buffers; returns the padded (captured) size."""
        bs = embeds.shape[0]
        padded = self.sizes[bisect.bisect_left(self.sizes, bs)]
        self.embeds[:bs].copy_(embeds)
        for i in range(bs):  # fill_ passes the int as a kernel argument: no host->device copy
            self.cache_lens[i].fill_(int(cache_lens[i]))
            self.slot_ids[i].fill_(int(slot_ids[i]))
        if padded > bs:  # safe padding: zero rows at length 0 in the scratch slot
            self.embeds[bs:padded].zero_()
            self.cache_lens[bs:padded].zero_()
            self.slot_ids[bs:padded].fill_(self.scratch_slot)
        return padded

    def replay(self, bs: int, padded: int) -> torch.Tensor:
        """Replays the graph of size `padded`; returns a view of its first `bs` output rows."""
        if self.debug:
            ptrs = (self.embeds.data_ptr(), self.cache_lens.data_ptr(), self.slot_ids.data_ptr())
            assert ptrs == self._ptrs, "static input buffers moved since capture"
        self.backend.replay(self.graphs[padded])
        return self.outputs[padded][:bs]
