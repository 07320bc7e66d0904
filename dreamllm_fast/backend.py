"""What a model backend offers the pipeline, the decode loop and the server, as types.

Three backends implement these protocols: the engine (dreamllm_fast/engine/model.py), the
transformers + diffusers reference (dreamllm_fast/reference/model.py) and the stub whose math costs
nothing (dreamllm_fast/devtools/stub.py). Callers (dreamllm_fast/pipeline.py, dreamllm_fast/decoding.py,
dreamllm_fast/serving/) use only what is declared here: no probing for optional methods.

`DecodeBatchBase` is the bookkeeping every backend's decode batch shares (steps launched and read,
the lengths at build, the committed-length check, the two-slot host ring for drawn ids); a backend
supplies only how a step runs and how accepted lengths are committed.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

import torch

from .errors import ContextOverflowError


@runtime_checkable
class Session(Protocol):
    """One sequence's KV cache; positions continue across calls."""

    length: int  # positions cached

    def extend(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append [n, H] embeddings; fp32 logits of the last position, [V]."""

    def extend_dream(self, embeds: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Append [n, H] embeddings; the projected condition at `rows`, [len(rows), C]."""

    def truncate(self, length: int) -> None:
        """Forget positions >= length."""

    def close(self) -> None:
        """Release the cache (idempotent)."""


@runtime_checkable
class DecodeBatch(Protocol):
    """Self-advancing decode steps over a fixed set of sessions (the decode loop's step).

    Each `launch()` feeds every row its previous token at position base + steps and draws the next
    on the device without blocking; `result()` returns the host ids of the oldest unread step.
    """

    logits: Optional[torch.Tensor]  # fp32 [B, V] of the latest launched step (until the next launch)
    launched: int  # steps launched so far

    @property
    def inflight(self) -> int:
        """Steps launched and not yet read (at most 2)."""

    def launch(self) -> None: ...

    def result(self) -> list[int]: ...

    def close(self, lengths: Sequence[int]) -> None:
        """Drain, then commit each session's accepted length."""

    def abort(self) -> None:
        """After an error: release without committing (callers close the sessions)."""


@runtime_checkable
class Backend(Protocol):
    """The model math: embeddings, the vision tower, sessions, batched passes, the diffusion nets."""

    name: str
    device: torch.device
    dtype: torch.dtype
    dream_queries: torch.Tensor  # [Q, H]
    max_len: int  # positions one session may hold
    prefill_chunk: int  # tokens per packed prefill pass a scheduler should aim for

    def embed_tokens(self, ids) -> torch.Tensor:
        """ids [n] -> [n, H]."""

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> projected features [N, P, H]."""

    def new_session(self) -> Session: ...

    def kv_slots(self) -> tuple[int, Optional[int]]:
        """(used, total) KV-cache slots; total None when each session grows its own cache."""

    def extend_batch(self, sessions: Sequence[Session], embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        """`extend` for several sessions in one pass: fp32 logits [B, V]."""

    def condition_pair(self, sessions: Sequence[Session], embeds: Sequence[torch.Tensor],
                       rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """`extend_dream` for several sessions in one pass (e.g. [uncond; cond])."""

    def decode_batch(self, sessions: Sequence[Session], token_ids: Sequence[int], params,
                     seeds: Sequence[int]) -> DecodeBatch:
        """token_ids: each session's previous token (host ints, not yet cached); params: one
        SamplingParams per row; seeds: 63-bit Philox keys per row (0 when greedy)."""

    def unet_eps(self, sample: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor: ...

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> image in [-1, 1]."""


class OneByOnePasses:
    """`extend_batch` and `condition_pair` as one call per session, for backends with no packed
    pass (the reference and the stub): same results, no speed-up."""

    prefill_chunk = 512

    def extend_batch(self, sessions, embeds) -> torch.Tensor:
        return torch.stack([s.extend(e) for s, e in zip(sessions, embeds, strict=True)])

    def condition_pair(self, sessions, embeds, rows) -> list[torch.Tensor]:
        return [s.extend_dream(e, r) for s, e, r in zip(sessions, embeds, rows, strict=True)]


class HostIds:
    """Where the drawn ids of up to two steps in flight land on the host.

    On CUDA: two pinned buffers, each filled by an async copy and marked by an event, so reading
    one step waits for that step only. Elsewhere: the ids as a plain list.
    """

    def __init__(self, rows: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self._host = [torch.empty(rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        else:
            self._host = [None, None]

    def put(self, k: int, ids) -> None:
        """ids: a device tensor [rows] (CUDA: copied without waiting, on the device's stream) or a list."""
        if self.cuda:
            self._host[k].copy_(ids, non_blocking=True)
            self._events[k].record(torch.cuda.current_stream(self.device))
        else:
            self._host[k] = ids.tolist() if isinstance(ids, torch.Tensor) else ids

    def get(self, k: int) -> list[int]:
        if self.cuda:
            self._events[k].synchronize()
            return self._host[k].tolist()
        return self._host[k]

    def wait(self, k: int) -> None:
        if self.cuda:
            self._events[k].synchronize()


class DecodeBatchBase:
    """The bookkeeping of a decode batch, shared by every backend.

    Subclasses implement `_launch(k)` (enqueue one step; its ids go to host slot k = step % 2),
    `_result(k)` (the host ids of slot k), `_commit(i, session, length)` (row i) and optionally
    `_drain()` and `_release()`. `max_len` (None: unchecked) bounds the positions a step may write.
    """

    max_len: Optional[int] = None

    def __init__(self, sessions: Sequence[Session]):
        self.sessions = list(sessions)
        self.B = len(self.sessions)
        self.base = [s.length for s in self.sessions]  # lengths at build; steps write base + launched
        self.launched = self.read = 0
        self.logits: Optional[torch.Tensor] = None

    @property
    def inflight(self) -> int:
        return self.launched - self.read

    def launch(self) -> None:
        """Enqueue one step for every row; never waits for the device."""
        assert self.inflight < 2, "two steps in flight: read one with result() first"
        if self.max_len is not None and max(self.base) + self.launched >= self.max_len:
            raise ContextOverflowError(f"a decode step would write position {max(self.base) + self.launched} "
                                       f"of a {self.max_len}-position context")
        self._launch(self.launched % 2)
        self.launched += 1

    def result(self) -> list[int]:
        """The drawn ids of the oldest unread step (waits for that step only)."""
        assert self.read < self.launched, "no step in flight"
        out = self._result(self.read % 2)
        self.read += 1
        return out

    def close(self, lengths: Sequence[int]) -> None:
        """Drain, then commit each session's accepted length (<= its length + steps launched)."""
        self._drain()
        self.read = self.launched
        for i, (s, L, base) in enumerate(zip(self.sessions, lengths, self.base, strict=True)):
            if not base <= int(L) <= base + self.launched:
                raise RuntimeError(f"committed length {L} outside [{base}, {base + self.launched}]")
            self._commit(i, s, int(L))
        self._release()

    def abort(self) -> None:
        """After an error: let go of the backend without committing (callers close the sessions)."""
        self._release()

    # -- what a backend supplies ------------------------------------------------------------------
    def _launch(self, k: int) -> None:
        raise NotImplementedError

    def _result(self, k: int) -> list[int]:
        raise NotImplementedError

    def _commit(self, i: int, session: Session, length: int) -> None:
        raise NotImplementedError

    def _drain(self) -> None:
        """Wait for the last launched step (close)."""

    def _release(self) -> None:
        """Let go of the backend's decode state (close and abort)."""
