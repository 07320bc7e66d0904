"""The batched scheduler's prefill: ONE packed pass per iteration (serving/batched.py).

A pass runs at most `prefill_chunk` tokens, packing the next pieces of several queued passes of
the same kind (prompts, dream branches, image feedback, conditions: work.py `Prefill`) into one
`Backend.extend_batch` or `Backend.condition_pair` call. A long prompt takes one chunk per
iteration, so every running sequence gets a token between two of its chunks. A pass that
finishes hands its output to the pass's `done` step: a prompt joins the decode loop, a condition
starts its images (serving/image_steps.py), a negative prompt's condition is kept.
"""
from __future__ import annotations

import time

import torch

from .work import Prefill


class PrefillPasses:
    """The prefill methods of `BatchedScheduler` (its state is declared in its __init__)."""

    def _prefill_pass(self) -> None:
        """One pass: the head pass's next piece, plus the next pieces of later passes of the same
        kind while the chunk has room (one pass for all of them on the engine)."""
        if not self._prefills:
            return
        kind = self._prefills[0].next_kind()
        picked, used = [], 0
        for p in self._prefills:
            a, b = p.next_piece()
            if p.next_kind() != kind or (picked and used + (b - a) > self._chunk):
                continue
            picked.append(p)
            used += b - a
            if used >= self._chunk:
                break
        pieces = [p.embeds[slice(*p.next_piece())] for p in picked]
        sessions = [p.session for p in picked]
        model = self._pipe.model
        t0 = time.perf_counter()
        try:
            if kind == "extend":
                if len(picked) == 1:
                    outs = [sessions[0].extend(pieces[0])]
                else:
                    outs = list(model.extend_batch(sessions, pieces))
            else:
                rows = [p.piece_rows() for p in picked]
                if len(picked) == 1:
                    outs = [sessions[0].extend_dream(pieces[0], rows[0])]
                else:
                    outs = model.condition_pair(sessions, pieces, rows)
        except Exception as e:  # noqa: BLE001 - a shared pass: every request in it fails
            for p in picked:
                self._fail(p.req, e)
            return
        finally:
            self._stage(picked[0].stage if kind == "extend" else "condition", t0)
        if self.observer is not None:
            self._observe("prefill", [(p.req.handle.request_id, p.label, b - a)
                                      for p, (a, b) in zip(picked, map(Prefill.next_piece, picked))])
        for p, out in zip(picked, outs):
            if p.req.finished:  # failed by an earlier pass's callback in this loop
                continue
            if p.advance():
                self._prefills.remove(p)
                try:
                    p.done(p, out)
                except Exception as e:  # noqa: BLE001 - this request's own work
                    self._fail(p.req, e)

    def _joined(self, p: Prefill, logits: torch.Tensor) -> None:
        """A prompt is in the cache: the sequence joins the decode loop."""
        c, r = p.choice, p.req
        c.seq = self.loop.add(c.session, logits, r.request.sampling, c.philox,
                              stop_ids=self._stops[r.kind],
                              pause_ids=(self._pipe.special.dream_start,) if r.kind == "interleaved" else (),
                              tag=c, stop_strings=r.request.stop)
        c.phase = "decode"

    def _negative_done(self, p: Prefill, cond: torch.Tensor) -> None:
        r = p.req
        r.uncond = cond
        self._close_session(r, p.session)

    def _cond_done(self, p: Prefill, cond: torch.Tensor) -> None:
        r = p.req
        self._close_session(r, p.session)
        w, h = r.request.image.size or (None, None)
        shape = self._pipe.latent_shape(h, w)
        for c in r.choices:
            c.generator = torch.Generator(device=self._pipe.model.device).manual_seed(int(c.seed))
            self._draw(c, cond, shape)
