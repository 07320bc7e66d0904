"""Admission into the batched scheduler (serving/batched.py): checks, the queue, KV slots.

On the event loop, `submit` checks a request before it queues (`sequential.prepare_request`:
prompt length against the context, sampling and diffusion settings) and preprocesses its images
off the worker thread; a full queue refuses at once (429). On the worker, `_admit` starts work
FIFO while KV slots are free: each choice of a chat or interleaved request opens a session (a
slot) for its whole life; a text-to-image request, and a negative prompt, hold one only for their
condition pass (work.py `Request.wants`). Starting a part queues its first prefill pass
(serving/prefill_pass.py).
"""
from __future__ import annotations

import asyncio
import logging
import time

import torch

from ..sampling import draw_seed
from .scheduler import GenerationRequest, RequestHandle
from .sequential import prepare_request
from .work import Prefill, Request

log = logging.getLogger("dreamllm_fast.serving")


class Admission:
    """The admission methods of `BatchedScheduler` (its state is declared in its __init__)."""

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        self._check_ready()
        pipe = self._pipe
        prepared, pixels = await asyncio.to_thread(self._prepare, pipe, request)
        handle = RequestHandle(prepared.request, prepared.prompt_tokens)
        req = Request(handle, prepared, pixels)
        handle._on_cancel = lambda h: self._on_cancel(req)
        # queued requests that free KV slots will take at the worker's next admission are not
        # waiting: a burst of max_queue + max_batch is served, not refused
        self._enqueue(req, spare=self._free_slots(),
                      served=f"up to {self.max_batch} sequences served together")
        return handle

    def _prepare(self, pipe, request):
        p = prepare_request(pipe, request, self._max_piece_chars)
        # CLIP preprocessing (resize, crop, normalize) here, off the worker thread
        pixels = pipe.preprocess(p.prompt.images) if p.prompt.images else None
        return p, pixels

    def _on_cancel(self, req: Request) -> None:
        """The client is gone (any thread): a queued request leaves at once, a running one at the
        worker's next iteration (before any further model work)."""
        with self._cv:
            if req in self._queue:
                self._queue.remove(req)
                self._count("cancelled")
                req.finished = req.closed = True
                req.handle.close()
                return
            if not req.finished:
                self._cancels.append(req)
                self._cv.notify()


    # -- admission (worker side) ----------------------------------------------------------------
    def _free_slots(self) -> int:
        used, total = self._pipe.kv_slots()
        return (self.max_batch if total is None else min(total, self.max_batch)) - used

    def _admit(self) -> None:
        """Start work FIFO while KV slots are free: admitted requests' waiting parts first, then
        the queue. A request blocked on its own condition pass lets later ones start."""
        for r in list(self._reqs):
            if not self._start(r):
                return
        while True:
            with self._cv:
                if not self._queue or self._free_slots() < 1:
                    return
                r = self._queue.popleft()
            self._reqs.append(r)
            try:
                t0 = time.perf_counter()
                r.embed(self._pipe)  # CLIP on its input images, prompt embeddings: once per request
                self._stage("encode", t0)
            except Exception as e:  # noqa: BLE001 - this request's own work
                self._fail(r, e)
                continue
            if not self._start(r):
                return

    def _start(self, r: Request) -> bool:
        """Start every part of `r` that can start; False when a slot ran out first."""
        model = self._pipe.model
        while not r.finished:
            part = r.wants()
            if part is None:
                return True
            if self._free_slots() < 1:
                return False
            try:
                session = model.new_session()
            except Exception as e:  # noqa: BLE001 - e.g. slots held outside this scheduler
                log.warning("no KV slot for %s: %s", r.handle.request_id, e)
                return False
            r.sessions.add(session)
            try:
                self._start_part(r, part, session)
            except Exception as e:  # noqa: BLE001 - this request's own work
                self._fail(r, e)
                return True
        return True

    def _start_part(self, r: Request, part, session) -> None:
        """Queue the pass of one part of `r` (a negative prompt, a condition, or a sequence's
        prompt) on its new session."""
        pipe = self._pipe
        if part == "negative":
            r.negative_started = True
            emb = pipe.embed_prompt(r.prepared.negative)
            self._prefills.append(Prefill(r, None, session, emb, self._chunk, self._negative_done,
                                          rows=_query_rows(r.prepared.negative, pipe),
                                          stage="condition", label="negative"))
        elif part == "cond":
            r.cond_started = True
            self._prefills.append(Prefill(r, None, session, r.embeds, self._chunk, self._cond_done,
                                          rows=_query_rows(r.prepared.prompt, pipe),
                                          stage="condition", label="cond"))
        else:  # a sequence: its generator draws the Philox key before anything else
            c = part
            c.generator = torch.Generator(device=pipe.model.device).manual_seed(int(c.seed))
            c.philox = draw_seed(c.generator) if r.request.sampling.do_sample else 0
            c.session = session
            c.phase = "prefill"
            self._prefills.append(Prefill(r, c, session, r.embeds, self._chunk, self._joined,
                                          label="prompt"))


def _query_rows(prompt, pipe) -> list[int]:
    """The dream query rows of a text-to-image (or negative) prompt: its last Q positions."""
    s, Q = prompt.dream_slots[-1], pipe.model.dream_queries.shape[0]
    return list(range(s, s + Q))
