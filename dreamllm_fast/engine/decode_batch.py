"""`EngineDecodeBatch`: the engine's side of the decode loop (dreamllm_fast/decoding.py).

The loop builds one per set of running sequences (`EngineModel.decode_batch`). Building copies the
rows' host state into the static `DecodeBuffers` once: previous ids, cache lengths, slots, `inc`
(1 live row, 0 padding), per-row sampling settings and Philox seeds (9 small non_blocking
copies from pinned memory: no host sync, see dreamllm_fast/devices.py).
After that a step is one replay of the captured self-advancing step (or the same function eagerly
on the CPU / without graphs) and an async copy of the drawn ids into pinned host memory.
"""
from __future__ import annotations

import torch

from ..backend import DecodeBatchBase, HostIds
from ..errors import EngineBusyError, InvalidInputError


class EngineDecodeBatch(DecodeBatchBase):
    """Self-advancing decode steps for a fixed set of sessions, one step ahead of the host.

    Built from host values (the previous ids, the sessions' lengths and slots, per-row sampling
    settings and seeds) that `EngineModel.start_decode` copies once into its static buffers; from
    then on every `launch()` is one graph replay (or the same step eagerly) plus an async copy of
    the drawn ids into pinned host memory (`HostIds`), and `result()` waits only for the oldest
    step. Sessions' host lengths stay at their values at build until `close(lengths)` commits what
    the loop accepted; K/V written by a discarded step lie at or past the committed length (never
    read, overwritten).
    """

    def __init__(self, model, sessions, token_ids, params, seeds):
        super().__init__(sessions)
        B = self.B
        if model.decoding is not None:
            raise EngineBusyError("a decode batch is already running on this engine; one DecodeLoop "
                                  "batches every sequence: add sequences to it instead")
        if not 1 <= B <= model.decode_capacity:
            raise InvalidInputError(f"a decode batch holds 1 to {model.decode_capacity} sequences, got {B}; "
                                    "raise EngineConfig.max_batch")
        if len({s.slot for s in sessions}) != B or any(s.closed or s.m is not model or s.decoding is not None
                                                       for s in sessions):
            raise InvalidInputError("decode_batch needs distinct open sessions of this engine")
        if not (len(token_ids) == len(params) == len(seeds) == B):
            raise InvalidInputError("decode_batch needs one token id, sampling setting and seed per session")
        V = model.vocab_size
        if any(not 0 <= int(t) < V for t in token_ids):
            raise InvalidInputError(f"token ids must be in [0, {V}), got {list(token_ids)}")
        for s in sessions:
            s.check_extend(1)
        self.m, self.max_len = model, model.max_len
        self.mode = "sample" if any(p.do_sample for p in params) else "greedy"
        self.n, self.graph = model.start_decode(self, token_ids, self.base, [s.slot for s in sessions],
                                                params, seeds, self.mode)
        self._ids = HostIds(B, model.device)
        self.cuda = self._ids.cuda
        for s in sessions:
            s.decoding = self

    @torch.no_grad()
    def _launch(self, k: int) -> None:
        self.logits, ids = self.m.decode_step(self.B, self.n, self.mode, self.graph)
        self._ids.put(k, ids)  # on the engine's device's stream (not the thread's current device's)

    def _result(self, k: int) -> list[int]:
        return self._ids.get(k)

    def _drain(self) -> None:
        if self.launched:
            self._ids.wait((self.launched - 1) % 2)

    def _commit(self, i: int, session, length: int) -> None:
        if not session.closed:
            session.length = length
        session.decoding = None

    def _release(self) -> None:
        self.m.end_decode(self)

    def abort(self) -> None:
        """After an error: let go of the engine without committing (callers close the sessions)."""
        try:
            if self.cuda:
                torch.cuda.current_stream(self.m.device).synchronize()
        finally:  # a sticky CUDA error raises here: the engine must not stay locked to this batch
            for s in self.sessions:
                s.decoding = None
            self._release()
