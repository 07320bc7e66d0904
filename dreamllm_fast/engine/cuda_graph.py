"""`CudaGraphRunner`: captured decode steps at a few batch sizes (after SGLang's runner).

Two kinds of step share the runner, each over its own static inputs (`engine/decode.py:
DecodeBuffers`), so one can never clobber the other's state:

- mode "logits": `session.extend` of one token per session (the bench's forward-only figure, the
  parity tests): embeds [B, H] + cache lengths + slots -> fp32 logits [B, V]. A call:

      padded = runner.prepare(embeds, cache_lens, slot_ids)  # copies into the static buffers
      logits = runner.replay(bs, padded)                     # view of the graph's output

- modes "greedy" and "sample": the decode loop's self-advancing step. It embeds the previous ids,
  runs the decoder, samples the next ids on the device (per-row settings and Philox keys, see
  dreamllm_fast/sampling.py), writes them back into its own `ids` input and adds `inc` (1 for a
  live row, 0 for padding) to its cache lengths: replaying it again needs no host work at all.
  "greedy" is argmax only (no sort); "sample" is the full path (greedy rows still argmax).

Each (size, mode) graph is captured largest size first into one shared memory pool after two
warm-up runs (the warm-ups compile/autotune the Triton kernels and allocate the kernels' cached
scratch, so the graph sees no first-call work). Warm-up, capture and replay go through a graph
backend of engine/graphs.py (`warmup(fn)`, `capture(fn) -> (graph, out)`, `replay(graph)`,
`synchronize()`), shared with the prefill graphs so that every graph lands in one pool:
`CudaGraphs` by default; `StandInGraphs` re-runs the step at replay, so the whole runner runs on
the CPU and on fake CUDA tensors (tests/decoding/test_engine_loop.py, devtools/check7b.py).
Padding rows carry zero embeddings / id 0, length 0,
inc 0 and the cache's scratch slot, so they write only scratch K/V and never touch a live sequence.
Outputs are views into graph memory: callers clone them before the next replay.
"""
from __future__ import annotations

import bisect
import time
import warnings
from typing import Callable, Sequence

import torch

from .graphs import CudaGraphs

CAPTURE_REMEDIES = (
    "remedies: (1) pass EngineConfig(use_cuda_graphs=False) to decode eagerly (same numbers, more "
    "launch overhead); (2) keep host syncs out of the decode step (.item(), .tolist(), print, "
    "data-dependent shapes); DREAMLLM_KERNELS=ref selects the torch references, which loop on the "
    "host and cannot be captured: unset it on CUDA; (3) free GPU memory or lower "
    "EngineConfig.cuda_graph_batch_sizes / max_batch (each size keeps its activations in the pool)"
)
MODES = ("logits", "greedy", "sample")
# A mode whose capture may fail without taking the engine down: its steps then run eagerly.
OPTIONAL_MODES = ("sample",)


StepFn = Callable[[int, str], torch.Tensor]  # (rows, mode) -> logits [rows, V], reads DecodeBuffers


class CudaGraphRunner:
    """Captured `step_fn(bs, mode)` for every capture size and mode (see the module docstring)."""

    def __init__(self, step_fn: StepFn, buffers, capture_sizes: Sequence[int],
                 device, modes: Sequence[str] = MODES, backend=None):
        """buffers: the step's static inputs (`engine/decode.py: DecodeBuffers`: `capacity`,
        `reset()`, and the "logits" mode's `embeds`, `cache_lens`, `slot_ids`, `scratch_slot`)."""
        self.step_fn = step_fn
        self.backend = backend  # engine.graphs backend; None: real CUDA graphs (CudaGraphs) at capture
        self.bufs = buffers
        self.sizes = sorted({int(s) for s in capture_sizes})
        assert self.sizes and self.sizes[0] >= 1, f"capture sizes must be >= 1, got {capture_sizes}"
        assert self.sizes[-1] <= buffers.capacity, "capture sizes exceed the static buffers"
        assert all(m in MODES for m in modes), f"modes must be among {MODES}, got {modes}"
        self.max_bs = self.sizes[-1]
        self.modes = tuple(modes)
        self.device = torch.device(device)
        self.graphs: dict[tuple[int, str], object] = {}
        self.step_outputs: dict[tuple[int, str], torch.Tensor] = {}  # views of graph memory
        self.skipped: dict[str, str] = {}  # optional modes whose capture failed -> reason
        self.capture_seconds = 0.0

    @torch.no_grad()
    def capture(self) -> None:
        t0 = time.perf_counter()
        if self.backend is None:
            self.backend = CudaGraphs(self.device)
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its pool blocks
            for mode in self.modes:
                if mode in self.skipped:
                    continue
                self.bufs.reset()  # warm-ups and capture write scratch K/V only

                def step(bs=bs, mode=mode):
                    return self.step_fn(bs, mode)

                try:
                    self.backend.warmup(step)  # compile + autotune + scratch allocation happen here
                    g, out = self.backend.capture(step)
                except Exception as e:
                    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if mode in OPTIONAL_MODES:
                        self.backend.synchronize()
                        self.skipped[mode] = why
                        warnings.warn(f"CUDA graph capture of the '{mode}' decode step failed ({why}); "
                                      f"those steps run eagerly (same numbers, more launch overhead)")
                        continue
                    raise RuntimeError(
                        f"CUDA graph capture of the '{mode}' decode step failed at batch size {bs} "
                        f"({why}); {CAPTURE_REMEDIES}") from e
                self.graphs[(bs, mode)] = g
                self.step_outputs[(bs, mode)] = out
        self.bufs.reset()
        self.backend.synchronize()
        self.capture_seconds = time.perf_counter() - t0

    def padded_size(self, bs: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, bs)]

    def can_run(self, bs: int, mode: str = "logits") -> bool:
        return 1 <= bs <= self.max_bs and (self.padded_size(bs), mode) in self.graphs

    def prepare(self, embeds: torch.Tensor, cache_lens: Sequence[int], slot_ids: Sequence[int]) -> int:
        """Mode "logits": copy one step's inputs into the static buffers; returns the padded size."""
        b = self.bufs
        bs = embeds.shape[0]
        padded = self.padded_size(bs)
        b.embeds[:bs].copy_(embeds)
        for i in range(bs):  # fill_ passes the int as a kernel argument: no host->device copy
            b.cache_lens[i].fill_(int(cache_lens[i]))
            b.slot_ids[i].fill_(int(slot_ids[i]))
        if padded > bs:  # safe padding: zero rows at length 0 in the scratch slot
            b.embeds[bs:padded].zero_()
            b.cache_lens[bs:padded].zero_()
            b.slot_ids[bs:padded].fill_(b.scratch_slot)
        return padded

    def replay(self, bs: int, padded: int, mode: str = "logits") -> torch.Tensor:
        """Replays the (padded, mode) graph; returns a view of its first `bs` logits rows."""
        self.backend.replay(self.graphs[(padded, mode)])
        return self.step_outputs[(padded, mode)][:bs]
