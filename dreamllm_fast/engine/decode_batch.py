"""`EngineDecodeBatch`: the engine's side of the decode loop (dreamllm_fast/decoding.py).

The loop builds one per set of running sequences (`EngineModel.decode_batch`). Building copies the
rows' host state into the static `DecodeBuffers` once: previous ids, cache lengths, slots, `inc`
(1 live row, 0 padding), per-row sampling settings and Philox seeds (9 small non_blocking
copies from pinned memory: no host sync, see dreamllm_fast/devices.py).
After that a step is one replay of the captured self-advancing step (or the same function eagerly
on the CPU / without graphs) and an async copy of the drawn ids into pinned host memory.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..devices import fill_from_host
from ..errors import ContextOverflowError, EngineBusyError, InvalidInputError


class EngineDecodeBatch:
    """Self-advancing decode steps for a fixed set of sessions, one step ahead of the host.

    Built from host values (the previous ids, the sessions' lengths and slots, per-row sampling
    settings and seeds) copied once into `model.bufs`; from then on every `launch()` is one graph
    replay (or the same step eagerly) plus an async copy of the drawn ids into pinned host memory
    (two buffers, an event each), and `result()` waits only for the oldest step. Sessions' host
    lengths stay at their values at build until `close(lengths)` commits what the loop accepted;
    K/V written by a discarded step lie at or past the committed length (never read, overwritten).
    """

    def __init__(self, model, sessions, token_ids, params, seeds):
        B = len(sessions)
        b = model.bufs
        if model._active_batch is not None:
            raise EngineBusyError("a decode batch is already running on this engine; one DecodeLoop "
                                  "batches every sequence: add sequences to it instead")
        if not 1 <= B <= b.capacity:
            raise InvalidInputError(f"a decode batch holds 1 to {b.capacity} sequences, got {B}; raise "
                                    "EngineConfig.max_batch")
        if len({s.slot for s in sessions}) != B or any(s._closed or s.m is not model or s._batch is not None
                                                       for s in sessions):
            raise InvalidInputError("decode_batch needs distinct open sessions of this engine")
        if not (len(token_ids) == len(params) == len(seeds) == B):
            raise InvalidInputError("decode_batch needs one token id, sampling setting and seed per session")
        V = model.weights.embed.shape[0]
        if any(not 0 <= int(t) < V for t in token_ids):
            raise InvalidInputError(f"token ids must be in [0, {V}), got {list(token_ids)}")
        for s in sessions:
            s._check(1)
        self.m, self.sessions, self.B = model, list(sessions), B
        self.mode = "sample" if any(p.do_sample for p in params) else "greedy"
        g = model.graphs
        self.graph = g is not None and g.can_run(B, self.mode)
        self.n = g.padded_size(B) if self.graph else B
        pad = b.capacity - B
        fill_from_host(b.ids, [int(t) for t in token_ids] + [0] * pad)
        fill_from_host(b.step_lens, [s.length for s in sessions] + [0] * pad)
        fill_from_host(b.step_slots, [s.slot for s in sessions] + [b.scratch_slot] * pad)
        fill_from_host(b.inc, [1] * B + [0] * pad)
        b.rows.set(params, seeds)
        self.base = [s.length for s in sessions]
        self.cuda = model.device.type == "cuda"
        if self.cuda:
            self._host = [torch.empty(B, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        else:
            self._host = [None, None]
        self.launched = self.read = 0
        self.logits: Optional[torch.Tensor] = None  # the latest launched step's [B, V] (graph memory)
        model._active_batch = self
        for s in sessions:
            s._batch = self

    @property
    def inflight(self) -> int:
        return self.launched - self.read

    @torch.no_grad()
    def launch(self) -> None:
        """Enqueue one step for every row; never waits for the device."""
        assert self.inflight < 2, "two steps in flight: read one with result() first"
        if max(self.base) + self.launched >= self.m.max_len:
            raise ContextOverflowError(f"a decode step would write position {max(self.base) + self.launched} "
                                       f"of a {self.m.max_len}-position context")
        if self.graph:
            self.logits = self.m.graphs.replay(self.B, self.n, self.mode)
        else:
            self.logits = self.m._step(self.n, self.mode)[:self.B]
        k = self.launched % 2
        ids = self.m.bufs.ids[:self.B]
        if self.cuda:  # on the engine's device's stream (not the thread's current device's)
            self._host[k].copy_(ids, non_blocking=True)
            self._events[k].record(torch.cuda.current_stream(self.m.device))
        else:
            self._host[k] = ids.tolist()
        self.launched += 1

    def result(self) -> list[int]:
        """The drawn ids of the oldest unread step (waits for that step only)."""
        assert self.read < self.launched, "no step in flight"
        k = self.read % 2
        if self.cuda:
            self._events[k].synchronize()
            out = self._host[k].tolist()
        else:
            out = self._host[k]
        self.read += 1
        return out

    def close(self, lengths: Sequence[int]) -> None:
        """Drain, then commit each session's accepted length (<= its length + steps launched)."""
        if self.cuda and self.launched:
            self._events[(self.launched - 1) % 2].synchronize()
        self.read = self.launched
        for s, L, base in zip(self.sessions, lengths, self.base):
            if not base <= int(L) <= base + self.launched:
                raise RuntimeError(f"committed length {L} outside [{base}, {base + self.launched}]")
            if not s._closed:
                s.length = int(L)
            s._batch = None
        self.m._active_batch = None

    def abort(self) -> None:
        """After an error: let go of the engine without committing (callers close the sessions)."""
        try:
            if self.cuda:
                torch.cuda.current_stream(self.m.device).synchronize()
        finally:  # a sticky CUDA error raises here: the engine must not stay locked to this batch
            for s in self.sessions:
                s._batch = None
            if self.m._active_batch is self:
                self.m._active_batch = None
