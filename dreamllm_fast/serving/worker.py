"""`WorkerScheduler`: the lifecycle the batched and sequential schedulers share.

One worker thread loads the pipeline, warms it up (the engine captures its graphs), turns the
scheduler ready and then serves; the event loop only checks and queues requests (`submit`: the
model-aware checks off the loop thread, then `_enqueue`, a bounded FIFO that refuses with 429 when
full) and reads their handles. Shutdown refuses what waits, stops what
runs and joins the worker. A device error that poisons the CUDA context (`devices.device_failed`)
ends the worker for good: `health()` reports it failed and the process should be restarted.
"""
from __future__ import annotations

import abc
import asyncio
import collections
import logging
import math
import threading
import time
from typing import Optional

from ..errors import InvalidInputError
from .scheduler import (GenerationRequest, Health, NotReadyError, QueueFullError, RequestFailed,
                        RequestHandle, Scheduler)

log = logging.getLogger("dreamllm_fast.serving")


class RateMeter:
    """Tokens per second over a sliding window (default 10 s), for the /metrics gauge."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._events: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def add(self, n: int, now: Optional[float] = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, n))

    def rate(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window_s



class WorkerScheduler(Scheduler):
    """A scheduler whose one worker thread loads, warms up and then owns the pipeline: the
    lifecycle the batched and sequential schedulers share (start, load and warm-up, health,
    submit, the bounded queue and its 429, shutdown, counters). A subclass supplies `_prepare` and
    `_queue_item` (what `submit` queues), `_serve` (its loop), and optionally `_spare` (queued items
    that are not waiting), `_warmed` (set-up after warm-up) and `_stop_running` (at shutdown)."""

    _thread_name = "dreamllm-worker"
    #: how many requests' worth of work run at once (Retry-After: the queue drains this fast)
    _parallel = 1
    #: how the worker serves, for the queue-full message
    _served = "one request served at a time"

    def _init_worker(self, load, max_queue: int, warmup: bool) -> None:
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise InvalidInputError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self._load = load if callable(load) else (lambda: load)
        self.max_queue = max_queue
        self.warmup = warmup
        self._pipe = None
        self._health = Health(False, "not started")
        self._thread: Optional[threading.Thread] = None
        self._broken: Optional[BaseException] = None  # a device error: no request can succeed now
        self._cv = threading.Condition()  # guards the queue and `_closing`
        self._closing = False
        self._queue: collections.deque = collections.deque()
        self._max_piece_chars = 64  # the longest vocabulary piece (stop-string hold-back), once loaded
        self._rate = RateMeter()
        self._latency_ema = 1.0  # seconds per request, for Retry-After
        self._stats_lock = threading.Lock()
        self._counters: collections.Counter = collections.Counter()
        self._stages: collections.Counter = collections.Counter()

    # -- the worker's life ----------------------------------------------------------------------
    def _worker(self) -> None:
        """Load and warm up (a failure is reported through `health()`, never raised), then serve
        until shut down."""
        try:
            pipe = self._load()
            t0 = time.perf_counter()
            if self.warmup:
                pipe.chat([{"role": "user", "content": "warm-up"}], max_new_tokens=2)
                pipe.text_to_image("warm-up", num_inference_steps=1, progress=False)
            self._warmed(pipe)
            log.info("warm-up took %.2f s", time.perf_counter() - t0)
            self._max_piece_chars = max(8, max(len(t) for t in pipe.tokenizer.get_vocab()))
        except BaseException as e:  # noqa: BLE001 - reported through /health, never raised
            log.exception("loading the model failed")
            self._health = Health(False, f"loading the model failed: {type(e).__name__}: {e}",
                                  failed=True)
            return
        self._pipe = pipe
        with self._cv:
            if self._closing:  # shut down while loading: never report ready
                return
            self._health = Health(True, "ready")
        self._serve(pipe)

    def _warmed(self, pipe) -> None:
        """Set-up after warm-up, on the worker thread, before the scheduler turns ready."""

    @abc.abstractmethod
    def _serve(self, pipe) -> None:
        """Serve requests until shut down (or until the device fails)."""

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closing = True
            pending = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        self._refuse([self._handle_of(x) for x in pending], "the server is shutting down; retry elsewhere")
        self._stop_running()
        if self._thread is not None:
            self._thread.join(timeout)
        self._health = Health(False, "shut down")

    def _stop_running(self) -> None:
        """At shutdown, after the queue is refused: stop what runs (default: the worker's loop
        sees `_closing`)."""

    @staticmethod
    def _handle_of(queued) -> "RequestHandle":
        """The handle of a queued item (the queue holds handles unless a subclass says otherwise)."""
        return queued

    # -- the queue (event-loop side) ------------------------------------------------------------
    async def submit(self, request: GenerationRequest) -> RequestHandle:
        """Check `request` against the model off the event loop (`_prepare`: prompt length, image
        sizes, sampling and diffusion settings), then queue it or refuse it at once (429)."""
        self._check_ready()
        prepared = await asyncio.to_thread(self._prepare, self._pipe, request)
        item = self._queue_item(prepared)
        self._enqueue(item, spare=self._spare(), served=self._served)
        return self._handle_of(item)

    @abc.abstractmethod
    def _prepare(self, pipe, request: GenerationRequest):
        """The checks and preparation of a request before it queues, on a thread of asyncio's
        pool (never the event loop, never the worker); raises InvalidInputError."""

    @abc.abstractmethod
    def _queue_item(self, prepared):
        """On the event loop: what the queue holds for a prepared request, its `RequestHandle`
        made (with its cancel hook)."""

    def _spare(self) -> int:
        """Queued items the worker takes at its next admission: not counted as waiting."""
        return 0

    def _enqueue(self, item, spare: int, served: str) -> None:
        """Queue `item` (under the lock), or refuse it at once with 429: the queue holds
        `max_queue` waiting items, plus `spare` that the worker takes at its next admission (they
        are not waiting). `served` says how the worker serves, for the message."""
        with self._cv:
            self._check_ready(closing_first=True)  # the worker may have stopped since
            if len(self._queue) >= self.max_queue + max(0, spare):
                self._count("rejected")
                wait = math.ceil(self._latency_ema * (len(self._queue) + 1) / self._parallel)
                raise QueueFullError(
                    f"the request queue is full ({self.max_queue} waiting, {served}); retry after "
                    f"the Retry-After seconds or raise --max-queue", retry_after=min(60, max(1, wait)))
            self._queue.append(item)
            self._cv.notify()

    # -- counters -------------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counters[key] += n

    def _stage(self, name: str, t0: float) -> None:
        """Add the host seconds since `t0` to stage `name` (/metrics)."""
        self._stage_add(name, time.perf_counter() - t0)

    def _stage_add(self, name: str, seconds: float) -> None:
        with self._stats_lock:
            self._stages[name] += seconds

    def _snapshot(self) -> tuple[dict, dict]:
        """(counters, stage seconds), copied under the lock."""
        with self._stats_lock:
            return dict(self._counters), dict(self._stages)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._health = Health(False, "loading the model")
        self._thread = threading.Thread(target=self._worker, name=self._thread_name, daemon=True)
        self._thread.start()

    def health(self) -> Health:
        return self._health

    @property
    def max_context(self) -> int:
        return self._pipe.max_len if self._pipe is not None else 0

    @property
    def image_tokens(self) -> int:
        return self._pipe.config.image_span_len if self._pipe is not None else 0

    @property
    def pipeline(self):
        """The pipeline this scheduler owns (None until loaded); only its worker thread calls it."""
        return self._pipe

    def _check_ready(self, closing_first: bool = False) -> None:
        """Raise NotReadyError unless the model is up and the scheduler open: on entry to
        `submit`, and again under `_cv` just before queueing (the worker may have stopped since)."""
        if closing_first and self._closing:
            raise NotReadyError("the server is shutting down; retry elsewhere")
        if self._pipe is None or not self._health.ready or self._closing:
            raise NotReadyError(f"the model is not ready ({self._health.detail}); retry later")

    @staticmethod
    def _refuse(handles, message: str) -> None:
        """Fail requests that never started (queued at a shutdown or a device failure)."""
        for h in handles:
            h.emit(RequestFailed(NotReadyError(message)))
            h.close()

    @staticmethod
    def _device_failed_detail(e: BaseException) -> str:
        return f"the device failed ({type(e).__name__}: {str(e).splitlines()[0]}); restart the server"


