"""The batched scheduler's units of work (serving/batched.py drives them).

- `Request`: one RequestHandle's work: its prompt embeddings (computed once for all choices), the
  condition of its negative prompt, its KV sessions, and its choices.
- `Choice`: one choice of a request: a sequence in the decode loop (chat, interleaved) or an image
  (text-to-image), with its own generator and phase
  (pending -> prefill -> decode [-> dream -> diffuse -> feedback -> decode]* -> done).
- `Prefill`: a multi-token pass into one session (a prompt, a dream branch, an image fed back, a
  condition), cut into pieces of at most `chunk` tokens that the worker runs one per iteration.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Union

import torch

from .scheduler import TextDelta


class Request:
    def __init__(self, handle, prepared, pixels: Optional[torch.Tensor]):
        self.handle = handle
        self.prepared = prepared  # admission.Prepared: the checked request and its built prompts
        self.request = prepared.request
        self.kind = self.request.kind
        self.pixels = pixels  # preprocessed input images [N, 3, S, S] (CLIP runs at admission)
        self.choices = [Choice(self, i, s) for i, s in enumerate(self.request.seeds)]
        self.embeds: Optional[torch.Tensor] = None  # [L, H], shared by every choice
        self.uncond: Optional[torch.Tensor] = None  # [Q, C] of the negative prompt
        self.negative_started = False
        self.cond_started = False
        self.sessions: set = set()  # every open session (sequences and condition passes)
        self.finished = False  # no more work (done, failed or cancelled)
        self.closed = False  # the handle is closed and the outcome counted
        self.t0 = time.monotonic()

    def embed(self, pipe) -> None:
        """The prompt's embeddings, input images' CLIP features spliced in (one CLIP call)."""
        feats = pipe.model.encode_images(self.pixels) if self.pixels is not None else None
        self.embeds = pipe.embed_prompt(self.prepared.prompt, feats)
        self.pixels = None

    def wants(self) -> Union[str, "Choice", None]:
        """The next part to start, each taking a KV slot: "negative" (the negative prompt's
        condition, first: every image of the request needs it), "cond" (a text-to-image prompt's
        condition, shared by its n images), or a pending sequence; None: nothing (now)."""
        if self.finished:
            return None
        if self.prepared.negative is not None and self.uncond is None:
            return None if self.negative_started else "negative"
        if self.kind == "image":
            return None if self.cond_started else "cond"
        return next((c for c in self.choices if c.phase == "pending"), None)


class Choice:
    def __init__(self, req: Request, index: int, seed: int):
        self.req = req
        self.index = index
        self.seed = seed  # the generator's seed: the request's seed + index
        self.generator: Optional[torch.Generator] = None
        self.philox = 0  # the sequence's sampling key, drawn from the generator (0: greedy)
        self.session = None
        self.seq = None  # its decoding.Sequence
        self.phase = "pending"
        self.images = 0  # images drawn so far (interleaved)
        self.prior: list[int] = []  # ids of a sequence the loop dropped in a reset (see rejoin)
        self.rejoin = False  # the loop reset while this sequence drew an image: add it anew
        self.done = False

    @property
    def active(self) -> bool:
        return self.phase not in ("pending", "done")

    def emit(self, text: str) -> None:
        """Stream a piece of this choice's text (already through its stop strings: the decode
        loop applies them)."""
        if text:
            self.req.handle.emit(TextDelta(self.index, text))

    def token_ids(self) -> list[int]:
        return self.prior + (list(self.seq.token_ids) if self.seq is not None else [])


class Prefill:
    """embeds [n, H] appended to `session` piece by piece. Pieces end at multiples of `chunk`
    from the pass's start, the cuts the engine makes inside one call (so a prompt's passes are
    the pipeline's passes); with condition `rows`, the last piece holds all of them.

    done(prefill, out) runs after the last piece: out is the last position's logits [V], or the
    projected condition at `rows` [len(rows), C].
    """

    def __init__(self, req: Request, choice: Optional[Choice], session, embeds: torch.Tensor,
                 chunk: int, done: Callable, rows: Optional[list[int]] = None, stage: str = "prefill",
                 label: str = ""):
        n = embeds.shape[0]
        ends = list(range(chunk, n, chunk)) + [n]
        if rows is not None:
            first = min(rows)
            ends = [e for e in ends if e <= first or e == n]
        if len(ends) > 1 and ends[-1] - ends[-2] == 1:
            # a 1-token piece would take the engine's decode step; inside a longer call it is the
            # prefill's last pass, as in the pipeline's one call
            del ends[-2]
        self.req, self.choice, self.session, self.embeds = req, choice, session, embeds
        self.n, self.ends, self.k, self.pos = n, ends, 0, 0
        self.rows, self.done, self.stage = rows, done, stage
        self.label = label or stage

    def next_piece(self) -> tuple[int, int]:
        return self.pos, self.ends[self.k]

    def next_kind(self) -> str:
        """"cond" for the last piece of a condition pass (its rows are read), else "extend"."""
        return "cond" if self.rows is not None and self.ends[self.k] == self.n else "extend"

    def piece_rows(self) -> list[int]:
        return [r - self.pos for r in self.rows]

    def advance(self) -> bool:
        """The next piece ran; True when it was the last."""
        self.pos = self.ends[self.k]
        self.k += 1
        return self.pos == self.n
