"""The engine's decode side: `EngineDecoder` (static buffers, the step a CUDA graph captures, the
captured graphs) and `EngineDecodeBatch` (the decode loop's batch, dreamllm_fast/decoding.py).

One step of the decode loop on the engine, in this file: `EngineDecodeBatch.launch` replays the
captured step (`CudaGraphRunner.replay`, engine/cuda_graph.py) or runs `EngineDecoder.step` eagerly,
which embeds the previous ids, runs the decoder (`LlamaRunner.decode_step`, engine/llm.py, down to
the decode-attention kernel), samples the next ids on the device and feeds them back into its own
input, then copies the ids into pinned host memory (`backend.HostIds`).

Building a batch copies the rows' host state into the static `DecodeBuffers` once: previous ids,
cache lengths, slots, `inc` (1 live row, 0 padding), per-row sampling settings and Philox seeds
(small non_blocking copies from pinned memory: no host sync, see dreamllm_fast/devices.py). From
then on a step needs no host work: replaying it again advances every live row by one token.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..backend import DecodeBatchBase, HostIds
from ..devices import fill_from_host
from ..errors import EngineBusyError, InvalidInputError
from ..sampling import SamplingParams, SamplingRows, sample_next
from .cuda_graph import MODES, CudaGraphRunner
from .llm import LlamaRunner


class DecodeBuffers:
    """Static inputs of the decode steps, `capacity` rows (the largest batch)."""

    def __init__(self, capacity: int, hidden_size: int, scratch_slot: int, device, dtype):
        self.capacity = capacity
        self.scratch_slot = scratch_slot
        d = dict(device=device)
        # mode "logits" (a single-token extend of several sessions)
        self.embeds = torch.zeros(capacity, hidden_size, dtype=dtype, **d)
        self.cache_lens = torch.zeros(capacity, dtype=torch.int32, **d)
        self.slot_ids = torch.full((capacity,), scratch_slot, dtype=torch.int32, **d)
        # modes "greedy" / "sample" (the decode loop's batch)
        self.ids = torch.zeros(capacity, dtype=torch.int64, **d)
        self.step_lens = torch.zeros(capacity, dtype=torch.int32, **d)
        self.step_slots = torch.full((capacity,), scratch_slot, dtype=torch.int32, **d)
        self.inc = torch.zeros(capacity, dtype=torch.int32, **d)
        self.rows = SamplingRows(capacity, device)

    def reset(self) -> None:
        """Safe values everywhere: every row is padding (length 0, scratch slot, no advance)."""
        self.embeds.zero_()
        self.cache_lens.zero_()
        self.slot_ids.fill_(self.scratch_slot)
        self.ids.zero_()
        self.step_lens.zero_()
        self.step_slots.fill_(self.scratch_slot)
        self.inc.zero_()
        self.rows.set([], [])


class EngineDecoder:
    """The decode steps of one engine: their static buffers, the step function, its graphs, and the
    decode batch that holds them now (`running`: one at a time, it owns the buffers)."""

    def __init__(self, llm: LlamaRunner, capacity: int, dtype):
        self.llm = llm
        self.embed = llm.w.embed  # [V, H]
        self.device = self.embed.device
        self.bufs = DecodeBuffers(capacity, self.embed.shape[1], llm.cache.scratch_slot, self.device, dtype)
        self.graphs: Optional[CudaGraphRunner] = None  # captured steps (None: every step eager)
        self.running: Optional[EngineDecodeBatch] = None

    @property
    def capacity(self) -> int:
        """The most rows one step runs (`EngineConfig.max_batch`)."""
        return self.bufs.capacity

    def capture(self, sizes: Sequence[int], backend, logits_mode: bool = False) -> None:
        """Capture the step at every batch size in `sizes` in modes "greedy" and "sample" (and
        "logits" when asked: benchmarks and parity tests), into `backend`'s shared pool."""
        modes = MODES if logits_mode else tuple(m for m in MODES if m != "logits")
        self.graphs = CudaGraphRunner(self.step, self.bufs, sizes, self.device, backend=backend, modes=modes)
        self.graphs.capture()

    def step(self, n: int, mode: str) -> torch.Tensor:
        """The decode step over the first n rows of the buffers (captured as is on CUDA).

        "logits": embeds -> logits. "greedy" / "sample": ids -> embed -> decoder -> logits; the
        lengths advance by `inc` (1 live, 0 padding), then the next ids are drawn at the new lengths
        (the positions the drawn tokens will occupy) and written back into `ids`. Returns the fp32
        logits [n, V] (graph memory on CUDA).
        """
        b = self.bufs
        if mode == "logits":
            return self.llm.decode_step(b.embeds[:n], b.cache_lens[:n], b.slot_ids[:n])
        lens = b.step_lens[:n]
        logits = self.llm.decode_step(F.embedding(b.ids[:n], self.embed), lens, b.step_slots[:n])
        lens.add_(b.inc[:n])
        b.ids[:n].copy_(sample_next(logits, b.rows.view(n), lens, greedy_only=(mode == "greedy")))
        return logits

    def logits(self, embeds: torch.Tensor, lengths: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """One token per session: embeds [B, H] -> fp32 logits [B, V] (a copy, safe to keep): the
        "logits" graph when one is captured at this size, else the decoder eagerly."""
        B = embeds.shape[0]
        if self.graphs is not None and self.graphs.can_run(B):
            padded = self.graphs.prepare(embeds, lengths, slots)
            return self.graphs.replay(B, padded).clone()  # outputs leave the graph as copies
        meta = torch.tensor(list(lengths) + list(slots), dtype=torch.int32).to(self.device)
        return self.llm.decode_step(embeds, meta[:B], meta[B:])


class EngineDecodeBatch(DecodeBatchBase):
    """Self-advancing decode steps for a fixed set of sessions, one step ahead of the host.

    Built from host values (the previous ids, the sessions' lengths and slots, per-row sampling
    settings and seeds) copied once into the decoder's static buffers; from then on every
    `launch()` is one graph replay (or the same step eagerly) plus an async copy of the drawn ids
    into pinned host memory (`HostIds`), and `result()` waits only for the oldest step. Sessions'
    host lengths stay at their values at build until `close(lengths)` commits what the loop
    accepted; K/V written by a discarded step lie at or past the committed length (never read,
    overwritten).
    """

    def __init__(self, decoder: EngineDecoder, sessions, token_ids: Sequence[int],
                 params: Sequence[SamplingParams], seeds: Sequence[int], max_len: int):
        super().__init__(sessions)
        B, d = self.B, decoder
        if d.running is not None:
            raise EngineBusyError("a decode batch is already running on this engine; one DecodeLoop "
                                  "batches every sequence: add sequences to it instead")
        if not 1 <= B <= d.capacity:
            raise InvalidInputError(f"a decode batch holds 1 to {d.capacity} sequences, got {B}; "
                                    "raise EngineConfig.max_batch")
        if len({s.slot for s in sessions}) != B or any(s.closed or getattr(s.m, "decoder", None) is not d or s.decoding is not None
                                                       for s in sessions):
            raise InvalidInputError("decode_batch needs distinct open sessions of this engine")
        if not (len(token_ids) == len(params) == len(seeds) == B):
            raise InvalidInputError("decode_batch needs one token id, sampling setting and seed per session")
        V = d.embed.shape[0]
        if any(not 0 <= int(t) < V for t in token_ids):
            raise InvalidInputError(f"token ids must be in [0, {V}), got {list(token_ids)}")
        for s in sessions:
            s.check_extend(1)
        self.d, self.max_len = d, max_len
        self.mode = "sample" if any(p.do_sample for p in params) else "greedy"
        # the rows' host state into the static buffers, once (padding rows step the scratch slot
        # and never advance)
        b, pad = d.bufs, d.capacity - B
        fill_from_host(b.ids, [int(t) for t in token_ids] + [0] * pad)
        fill_from_host(b.step_lens, list(self.base) + [0] * pad)
        fill_from_host(b.step_slots, [s.slot for s in sessions] + [b.scratch_slot] * pad)
        fill_from_host(b.inc, [1] * B + [0] * pad)
        b.rows.set(params, seeds)
        self.graph = d.graphs is not None and d.graphs.can_run(B, self.mode)
        self.n = d.graphs.padded_size(B) if self.graph else B  # rows each step runs
        self._ids = HostIds(B, d.device)
        self.cuda = self._ids.cuda
        d.running = self
        for s in sessions:
            s.decoding = self

    @torch.no_grad()
    def _launch(self, k: int) -> None:
        d, B = self.d, self.B
        self.logits = d.graphs.replay(B, self.n, self.mode) if self.graph else d.step(self.n, self.mode)[:B]
        self._ids.put(k, d.bufs.ids[:B])  # on the engine's device's stream

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
        if self.d.running is self:
            self.d.running = None

    def abort(self) -> None:
        """After an error: let go of the engine without committing (callers close the sessions)."""
        try:
            if self.cuda:
                torch.cuda.current_stream(self.d.device).synchronize()
        finally:  # a sticky CUDA error raises here: the engine must not stay locked to this batch
            for s in self.sessions:
                s.decoding = None
            self._release()
