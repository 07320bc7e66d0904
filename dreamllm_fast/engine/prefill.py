"""`PrefillRunner`: chunked, bucketed prefill over static buffers, captured per bucket on CUDA.

Every multi-token pass of the engine goes through here: prompt prefill, the dream branch (64
queries after `<dream_start>`), the image feedback pass and the packed [uncond; cond] condition
pair. Measured on an H100 before this runner (bench_report.json, 2026-11-23): prefill of one image +
512 text tokens 61.4 ms against a 13.65 ms FLOP floor, the dream branch 85.0 ms against 4.5 ms,
because ~9 launches x 32 layers each paid host time; a replayed graph pays none of it.

A call `prefill(embeds, cache_lens, slots, rows)` (B sequences, each new rows appended at its own
cache length in its own slot) becomes passes of at most `chunk` tokens (chunked prefill: the
largest bucket is the chunk size). Each pass is packed into the static buffers and padded to the
next bucket T (bisect):

    x[:T]        embeddings: real rows, then zero padding rows
    cu_seqlens   [B_max + 1]: the real sequences, then ONE padding sequence holding the T - n
                 padding rows, then empty sequences (q_len 0) up to B_max = max_seqs + 1
    cache_lens   real lengths; 0 for padding and empty sequences
    slot_ids     real slots; the cache's scratch slot for padding and empty sequences

so padding rows write only scratch positions [0, T - n) (fewer than the bucket gap, which sizes the
scratch slot) and never a live sequence. The step is `LlamaRunner.prefill(x[:T], ..., T,
out=hidden[:T])` with max_seqlen_q = T: the same launches with the same shapes whether the graph
of bucket T is replayed or the step runs eagerly (`use_graphs = False`), so the two are equal bit
for bit. The requested rows of each pass are gathered from the static output right after the pass.

Without buckets (`EngineConfig(prefill_buckets=())`) a pass runs unpadded and eagerly: the
reference against which the bucketed path is tested.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Optional, Sequence

import torch

from ..devices import fill_from_host, to_device
from ..errors import InvalidInputError
from .llm import LlamaRunner

PREFILL_CAPTURE_REMEDIES = (
    "remedies: (1) pass EngineConfig(use_cuda_graphs=False) to prefill eagerly with the same "
    "bucketed shapes (same numbers, more launch overhead); (2) keep host syncs out of the prefill "
    "step (.item(), .tolist(), print, data-dependent shapes); DREAMLLM_KERNELS=ref selects the "
    "torch references, which loop on the host and cannot be captured: unset it on CUDA; (3) free GPU "
    "memory or lower EngineConfig.prefill_buckets / prefill_chunk (the largest bucket's activations "
    "size the shared pool)"
)


def bucket_gap(buckets: Sequence[int]) -> int:
    """Largest distance between consecutive buckets (from 0): a pass pads fewer rows than this."""
    b = sorted(buckets)
    return max(hi - lo for lo, hi in zip([0] + b[:-1], b)) if b else 0


def cu_seqlens(lens: Sequence[int]) -> list[int]:
    """Where each packed sequence starts, then the total: [0, n0, n0 + n1, ...] (host ints)."""
    return list(itertools.accumulate((int(n) for n in lens), initial=0))


class PrefillRunner:
    """Packed prefill of up to `max_seqs` sequences per pass; see the module docstring."""

    def __init__(self, llm: LlamaRunner, buckets: Sequence[int], chunk: Optional[int], max_seqs: int,
                 device, dtype):
        self.llm = llm
        self.buckets = sorted({int(b) for b in buckets})
        self.chunk = int(chunk) if chunk else (self.buckets[-1] if self.buckets else None)
        assert not self.buckets or self.chunk <= self.buckets[-1], "the largest bucket must hold a chunk"
        self.max_seqs = max_seqs
        self.device = torch.device(device)
        self.dtype = dtype
        self.hidden_size = llm.w.embed.shape[1]
        self.scratch_slot = llm.cache.scratch_slot
        self.graphs: dict[int, object] = {}
        self.backend = None
        self.use_graphs = True  # False: the same bucketed step, eagerly (graph == eager tests)
        if self.buckets:
            T, H, B = self.buckets[-1], self.hidden_size, max_seqs + 1
            assert bucket_gap(self.buckets) <= llm.cache.scratch_len, \
                f"the KV cache's scratch slot ({llm.cache.scratch_len} positions) is shorter than the " \
                f"bucket gap {bucket_gap(self.buckets)}: padding would overrun it"
            self.x = torch.zeros(T, H, device=self.device, dtype=dtype)  # static inputs
            self.hidden = torch.zeros(T, H, device=self.device, dtype=dtype)  # static output
            self.meta = torch.zeros(3 * B + 1, device=self.device, dtype=torch.int32)
            self.cu_seqlens = self.meta[:B + 1]
            self.cache_lens = self.meta[B + 1:2 * B + 1]
            self.slot_ids = self.meta[2 * B + 1:]

    # -- one pass -----------------------------------------------------------------------------
    def bucket(self, n: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    def _step(self, T: int):
        def step():
            return self.llm.prefill(self.x[:T], self.cu_seqlens, self.cache_lens, self.slot_ids, T,
                                    out=self.hidden[:T])
        return step

    def _write_meta(self, lens: Sequence[int], cache_lens: Sequence[int], slots: Sequence[int]) -> None:
        """Real sequences, then the padding/empty ones (length 0 unless given) on the scratch slot."""
        B = self.max_seqs + 1
        cu = cu_seqlens(lens)
        cu += [cu[-1]] * (B + 1 - len(cu))
        pad = B - len(cache_lens)
        fill_from_host(self.meta, cu + list(cache_lens) + [0] * pad + list(slots) + [self.scratch_slot] * pad)

    def prepare(self, pieces: Sequence[torch.Tensor], cache_lens: Sequence[int], slots: Sequence[int]) -> int:
        """Pack one pass (pieces[i]: [n_i, H] appended at cache_lens[i] of slots[i]) into the static
        buffers, padded to its bucket; returns the bucket size T."""
        assert len(pieces) <= self.max_seqs, f"{len(pieces)} sequences in one pass, room for {self.max_seqs}"
        n = sum(p.shape[0] for p in pieces)
        T = self.bucket(n)
        off = 0
        for p in pieces:
            self.x[off:off + p.shape[0]].copy_(p)
            off += p.shape[0]
        lens = [p.shape[0] for p in pieces]
        if T > n:  # one padding sequence on the scratch slot, from position 0
            self.x[n:T].zero_()
            lens.append(T - n)
        self._write_meta(lens, cache_lens, slots)
        return T

    def run(self, T: int) -> torch.Tensor:
        """The prepared pass: replays bucket T's graph, or runs its step eagerly -> hidden [T, H]."""
        g = self.graphs.get(T) if self.use_graphs else None
        if g is None:
            return self._step(T)()
        self.backend.replay(g)
        return self.hidden[:T]

    def _pass(self, pieces, cache_lens, slots) -> torch.Tensor:
        """One pass -> pre-norm hidden of its packed real rows, [n, H]."""
        if self.buckets:
            n = sum(p.shape[0] for p in pieces)
            return self.run(self.prepare(pieces, cache_lens, slots))[:n]
        cu = cu_seqlens([p.shape[0] for p in pieces])
        meta = to_device(cu + list(cache_lens) + list(slots), torch.int32, self.device)
        B = len(pieces)
        x = torch.cat(list(pieces)) if B > 1 else pieces[0]
        return self.llm.prefill(x.to(self.device, self.dtype), meta[:B + 1], meta[B + 1:2 * B + 1],
                                meta[2 * B + 1:], max(p.shape[0] for p in pieces))

    # -- a whole call -------------------------------------------------------------------------
    def prefill(self, embeds: Sequence[torch.Tensor], cache_lens: Sequence[int], slots: Sequence[int],
                rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append embeds[b] ([n_b, H]) to sequence b (cache length cache_lens[b], slot slots[b]).

        Returns the pre-norm hidden states at rows[b] (indices into embeds[b]) for every b,
        concatenated in order: [sum_b len(rows[b]), H].
        """
        H = self.hidden_size
        for e in embeds:
            if e.dim() != 2 or e.shape[1] != H or e.shape[0] < 1:
                raise InvalidInputError(f"embeddings must be [n >= 1, {H}], got {list(e.shape)}")
        chunk = self.chunk or sum(e.shape[0] for e in embeds)
        passes, cur, used = [], [], 0  # a pass: [(b, start, n)]
        for b, e in enumerate(embeds):
            start = 0
            while start < e.shape[0]:
                take = min(e.shape[0] - start, chunk - used)
                cur.append((b, start, take))
                used, start = used + take, start + take
                if used == chunk:
                    passes.append(cur)
                    cur, used = [], 0
        if cur:
            passes.append(cur)
        wanted = [sorted({int(r) for r in rr}) for rr in rows]
        parts, got = [], []  # got: the (b, row) of each gathered row, in gather order
        for ps in passes:
            idx, off = [], 0
            for b, start, n in ps:
                for r in wanted[b]:
                    if start <= r < start + n:
                        idx.append(off + r - start)
                        got.append((b, r))
                off += n
            hidden = self._pass([embeds[b][s:s + n] for b, s, n in ps],
                                [cache_lens[b] + s for b, s, _ in ps], [slots[b] for b, _, _ in ps])
            if idx:  # gather now: the next pass (or replay) overwrites the static output
                parts.append(hidden.index_select(0, to_device(idx, torch.long, self.device)))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        pos = {key: i for i, key in enumerate(got)}
        order = [pos[(b, int(r))] for b, rr in enumerate(rows) for r in rr]  # the caller's order
        if order != list(range(out.shape[0])):
            out = out.index_select(0, to_device(order, torch.long, self.device))
        return out

    # -- capture ------------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, backend) -> None:
        """Warm up and capture every bucket, largest first (one shared memory pool).

        Warm-ups and captures run one padding sequence of min(T, scratch_len) rows on the scratch
        slot (every other sequence empty): the kernels compile and autotune at the real grid sizes,
        and nothing but scratch positions is written.
        """
        self.backend = backend
        scratch = self.llm.cache.scratch_len
        for T in reversed(self.buckets):
            self.x[:T].zero_()
            self._write_meta([min(T, scratch)], [], [])
            step = self._step(T)
            try:
                backend.warmup(step)
                g, _ = backend.capture(step)
            except Exception as e:
                raise RuntimeError(
                    f"CUDA graph capture of the prefill step failed at bucket {T} "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    f"{PREFILL_CAPTURE_REMEDIES}") from e
            self.graphs[T] = g
