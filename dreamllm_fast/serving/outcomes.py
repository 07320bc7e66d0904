"""How a batched request ends (serving/batched.py): a choice completes, a request fails or is
cancelled; slots free at once, the handle gets its last event, the outcome is counted."""
from __future__ import annotations

import logging
import time
from typing import Optional

from ..devices import device_failed
from ..errors import InvalidInputError
from .scheduler import ChoiceDone, NotReadyError, RequestFailed
from .work import Choice, Request

log = logging.getLogger("dreamllm_fast.serving")


class Outcomes:
    """The ending methods of `BatchedScheduler` (its state is declared in its __init__)."""

    def _complete(self, c: Choice, reason: Optional[str], last: str = "") -> None:
        """A choice is done: ChoiceDone with its last text (`last`: the decode loop's final piece,
        stop strings applied), and its slot back at once. reason None: "stop" when the last id is
        a stop id, else "length"."""
        if c.done:
            return
        ids = c.token_ids()
        if reason is None:  # as the sequential scheduler reports it: a stop id, or a limit
            sp = self._pipe.special
            reason = "stop" if ids and ids[-1] in (sp.eos, sp.bos, sp.dream_start) else "length"
        r = c.req
        self._count("generated_tokens", len(ids))
        self._count("prompt_tokens", r.handle.prompt_tokens)
        r.handle.emit(ChoiceDone(c.index, reason, len(ids), last))
        self._release(c)
        if all(x.done for x in r.choices):
            self._end(r, "ok")

    def _release(self, c: Choice) -> None:
        c.done = True
        c.phase = "done"
        if c.seq is not None and not c.seq.finished:
            seq = c.seq
            self._loop_call(lambda: self.loop.finish(seq, "cancelled"))
        if c.session is not None:
            self._close_session(c.req, c.session)
            c.session = None

    def _close_session(self, r: Request, session) -> None:
        r.sessions.discard(session)
        session.close()

    def _fail(self, r: Request, error: Optional[BaseException], outcome: str = "failed") -> None:
        """End a whole request: its sequences leave the loop, its passes and images are dropped,
        its sessions close (slots free at once). error None: cancelled (the client is gone)."""
        if r.finished:
            return
        r.finished = True  # first: the loop calls below may fail and come back here
        self._prefills = [p for p in self._prefills if p.req is not r]
        self._images = [(c, j) for c, j in self._images if c.req is not r]
        for c in r.choices:
            if not c.done:
                self._release(c)
        for s in list(r.sessions):
            self._close_session(r, s)
        if error is not None and device_failed(error):
            self._broken = error  # the worker stops after this iteration
        if error is not None:
            if not isinstance(error, (InvalidInputError, NotReadyError)):
                log.error("request %s failed: %s: %s", r.handle.request_id, type(error).__name__, error)
            r.handle.emit(RequestFailed(error))
        self._end(r, outcome)

    def _end(self, r: Request, outcome: str) -> None:
        r.finished = True
        if r.closed:
            return
        r.closed = True
        if r in self._reqs:
            self._reqs.remove(r)
        r.handle.close()
        self._count(outcome)
        self._latency_ema = 0.8 * self._latency_ema + 0.2 * (time.monotonic() - r.t0)
