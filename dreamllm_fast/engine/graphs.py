"""Graph backends for the engine's captured steps: real CUDA graphs, and a stand-in for tests.

Every graph runner of the engine (decode steps, prefill chunks, the dream branch, the condition pair)
does its own bookkeeping (static buffers, buckets, padding, `prepare`) and leaves exactly three
things to a backend: warm-ups before capture, capture of a step, replay. Two backends:

- `CudaGraphs`: `torch.cuda.CUDAGraph` captured on a side stream, all graphs in ONE memory pool
  (the backend owns it: runners capture largest first so smaller graphs reuse its blocks, SGLang's
  scheme). `pool_bytes()` reads the pool's segments from the caching allocator.
- `StandInGraphs`: captures by running the step once and replays by running it again, copying the
  new outputs into the captured output tensors (what a replay does to graph memory). It needs no
  driver, so the whole runner code path runs on the CPU and on fake CUDA tensors; an optional
  `guard` (e.g. `devtools.fake_cuda.NoHostSync`) wraps every captured or replayed run, and an optional
  `memory` probe gives a pool-size estimate from the live bytes during each capture.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional

import torch
from torch.utils._pytree import tree_leaves

Step = Callable[[], Any]


class CudaGraphs:
    """Real CUDA graphs on `device`, one shared memory pool for every graph captured here."""

    name = "cuda"

    def __init__(self, device):
        self.device = torch.device(device)
        self.pool = None  # torch.cuda graph pool handle, created by the first capture
        self._stream: Optional[torch.cuda.Stream] = None
        self.capture_seconds = 0.0

    @property
    def stream(self) -> "torch.cuda.Stream":
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    def warmup(self, fn: Step, runs: int = 2) -> None:
        """Eager runs on the capture stream: Triton compiles/autotunes and lazy scratch buffers are
        allocated here, never inside a capture."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for _ in range(runs):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        torch.cuda.synchronize(self.device)

    def capture(self, fn: Step, generators=()):
        """Returns (graph, outputs of the captured run). Outputs live in the shared pool.
        generators: CUDA generators the step draws from (registered with the graph, so each
        replay draws from their state at replay time and advances them)."""
        t0 = time.perf_counter()
        g = torch.cuda.CUDAGraph()
        for gen in generators:
            g.register_generator_state(gen)
        with torch.cuda.graph(g, pool=self.pool, stream=self.stream):
            out = fn()
        if self.pool is None:
            self.pool = g.pool()
        self.capture_seconds += time.perf_counter() - t0
        return g, out

    def replay(self, graph) -> None:
        graph.replay()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def pool_bytes(self) -> int:
        """Bytes the caching allocator holds in this backend's pool (segments tagged with its id)."""
        if self.pool is None:
            return 0
        pid = tuple(self.pool)
        return sum(int(s["total_size"]) for s in torch.cuda.memory_snapshot()
                   if tuple(s.get("segment_pool_id", ())) == pid)


class _StandInGraph:
    __slots__ = ("fn", "out")

    def __init__(self, fn: Step, out: Any):
        self.fn = fn
        self.out = out


class StandInGraphs:
    """Records the step at capture and re-runs it at replay (no driver needed).

    guard: a zero-argument factory of a context manager wrapped around every captured and replayed
    run (not the warm-ups, which may do host work as on a GPU: compile, autotune). memory: a zero-argument callable
    returning live device bytes, and `reset_peak()`/`peak` on the same object if given as a tracker;
    used for `pool_bytes()`: the pool a real capture would fill is estimated as, largest graph first,
    the bytes kept alive by earlier captures plus the peak of the current one above its baseline.
    """

    name = "stand-in"

    def __init__(self, guard: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                 memory=None, warmup_runs: Optional[int] = None):
        self.guard = guard or contextlib.nullcontext
        self.memory = memory
        self.warmup_runs = warmup_runs  # None: as the runner asks; 0 on fake tensors (nothing to compile)
        self.capture_seconds = 0.0
        self.captures = 0
        self.replays = 0
        self._kept = 0  # bytes retained by earlier captures (outputs held by the runners)
        self._pool = 0

    def warmup(self, fn: Step, runs: int = 2) -> None:
        for _ in range(runs if self.warmup_runs is None else self.warmup_runs):
            fn()

    def capture(self, fn: Step, generators=()):
        t0 = time.perf_counter()
        if self.memory is not None:
            base = self.memory.live
            self.memory.reset_peak()
        with self.guard():
            out = fn()
        if self.memory is not None:
            self._pool = max(self._pool, self._kept + self.memory.peak - base)
            self._kept += max(0, self.memory.live - base)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0
        return _StandInGraph(fn, out), out

    def replay(self, graph: _StandInGraph) -> None:
        with self.guard():
            new = graph.fn()
        for dst, src in zip(tree_leaves(graph.out), tree_leaves(new)):
            if isinstance(dst, torch.Tensor) and dst is not src:
                dst.copy_(src)  # a replay rewrites the captured outputs in place
        self.replays += 1

    def synchronize(self) -> None:
        pass

    def pool_bytes(self) -> int:
        return self._pool
