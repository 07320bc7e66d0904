"""`SequentialScheduler`: one request at a time through `DreamLLMPipeline` (the serving baseline).

One worker thread owns the pipeline: it loads the checkpoint, warms up, then takes requests from a
bounded FIFO queue and runs each to the end (choice after choice) with the pipeline's public API.
Concurrency is admission only: requests wait, they are never batched. This is the
"one-request-at-a-time serving" that the load benchmark compares the batched scheduler against.

Cancellation: a chat answer streams token by token, so a cancelled request stops at the next token
and its session (KV slot) is closed at once; a queued request leaves the queue at once. Interleaved
answers and images run as one pipeline call each (the pipeline has no streaming interleaved API),
so they stop at the next call boundary.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Optional, Union

import torch

from ..devices import device_failed
from ..errors import InvalidInputError
from .scheduler import (ChoiceDone, GenerationRequest, Health, ImageResult, RequestFailed,
                        RequestHandle, SchedulerStats, TextDelta)
from .admission import prepare_request
from .worker import WorkerScheduler

log = logging.getLogger("dreamllm_fast.serving")


class SequentialScheduler(WorkerScheduler):
    """load: a `DreamLLMPipeline`, or a function returning one (called on the worker thread, so
    the server answers /health with 503 while the weights load)."""

    name = "sequential"
    _thread_name = "dreamllm-sequential"

    def __init__(self, load: Union[Callable[[], object], object], *, max_queue: int = 64,
                 warmup: bool = True):
        self._init_worker(load, max_queue, warmup)
        self._running: Optional[RequestHandle] = None

    def _stop_running(self) -> None:
        with self._cv:
            running = self._running
        if running is not None:
            running.cancel()

    # -- admission (worker.py's submit: _prepare, then _queue_item) ---------------------------
    def _queue_item(self, prepared) -> RequestHandle:
        request, prompt_tokens = prepared
        handle = RequestHandle(request, prompt_tokens)
        handle._on_cancel = self._dequeue
        return handle

    def _spare(self) -> int:
        return int(self._running is None)  # the head of the queue is not waiting when the worker is free

    def _dequeue(self, handle: RequestHandle) -> None:
        with self._cv:
            if handle in self._queue:  # still waiting: its place frees at once
                self._queue.remove(handle)
                self._count("cancelled")
                handle.close()

    def _prepare(self, pipe, req: GenerationRequest) -> tuple[GenerationRequest, int]:
        """Checks before queueing; returns the request with max_new_tokens resolved, and the
        prompt length in tokens (image spans included)."""
        p = prepare_request(pipe, req, self._max_piece_chars)
        return p.request, p.prompt_tokens

    # -- the worker ---------------------------------------------------------------------------
    def _serve(self, pipe) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
                handle = self._running = self._queue.popleft()
            try:
                self._run(pipe, handle)
            finally:
                with self._cv:
                    self._running = None
            if self._broken is not None:  # no later request can succeed in this process
                e = self._broken
                why = self._device_failed_detail(e)
                log.error("%s", why)
                self._health = Health(False, why, failed=True)
                with self._cv:
                    pending = list(self._queue)
                    self._queue.clear()
                self._refuse(pending, f"{why}; retry elsewhere")
                return

    def _run(self, pipe, handle: RequestHandle) -> None:
        req = handle.request
        t0 = time.monotonic()
        outcome = "ok"
        try:
            for i, seed in enumerate(req.seeds):
                if handle.cancelled:
                    break
                g = torch.Generator(device=pipe.model.device).manual_seed(int(seed))
                getattr(self, f"_run_{req.kind}")(pipe, handle, i, g)
                for stage, seconds in pipe.last_timings.items():
                    self._stage_add(stage, seconds)
            if handle.cancelled:
                outcome = "cancelled"
        except Exception as e:  # noqa: BLE001 - the request fails, the server keeps serving
            outcome = "failed"
            if not isinstance(e, InvalidInputError):
                log.exception("request %s failed", handle.request_id)
            handle.emit(RequestFailed(e))
            if device_failed(e):
                self._broken = e
        finally:
            handle.close()
            self._count(outcome)
            self._latency_ema = 0.8 * self._latency_ema + 0.2 * (time.monotonic() - t0)

    def _finish(self, pipe, handle, i: int, reason: Optional[str]) -> None:
        ids = pipe.last_token_ids()
        sp = pipe.special
        if reason is None:  # the walk ended on its own: a stop token or string, or a limit
            stopped = pipe.last_finish_reason() == "stop" or (ids and ids[-1] in (sp.eos, sp.bos, sp.dream_start))
            reason = "stop" if stopped else "length"
        self._counters_tokens(len(ids), handle.prompt_tokens)
        handle.emit(ChoiceDone(i, reason, len(ids)))

    def _counters_tokens(self, generated: int, prompt: int) -> None:
        self._rate.add(generated)
        self._count("generated_tokens", generated)
        self._count("prompt_tokens", prompt)

    def _run_chat(self, pipe, handle, i, g) -> None:
        req, sp = handle.request, handle.request.sampling
        it = pipe.chat(req.messages, max_new_tokens=sp.max_new_tokens, do_sample=sp.do_sample,
                       temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, stream=True,
                       generator=g, stop=req.stop)  # the decode loop applies the stop strings
        reason = None
        try:
            for piece in it:
                if piece:
                    handle.emit(TextDelta(i, piece))
                if handle.cancelled:
                    reason = "cancelled"
                    break
        finally:
            it.close()  # closes the session: its KV slot is free before the next request
        self._finish(pipe, handle, i, reason)

    def _run_completion(self, pipe, handle, i, g) -> None:
        req, sp = handle.request, handle.request.sampling
        doc = pipe.complete(req.content, max_new_tokens=sp.max_new_tokens, max_images=0,
                            do_sample=sp.do_sample, temperature=sp.temperature, top_p=sp.top_p,
                            top_k=sp.top_k, generator=g, stop=req.stop)
        if doc and doc[0]:
            handle.emit(TextDelta(i, doc[0]))
        self._finish(pipe, handle, i, None)

    def _run_interleaved(self, pipe, handle, i, g) -> None:
        req, sp, o = handle.request, handle.request.sampling, handle.request.image
        doc = pipe.generate(req.messages, max_new_tokens=sp.max_new_tokens, max_images=o.max_images,
                            num_inference_steps=o.num_inference_steps,
                            guidance_scale=o.guidance_scale, negative_prompt=o.negative_prompt,
                            do_sample=sp.do_sample, temperature=sp.temperature, top_p=sp.top_p,
                            top_k=sp.top_k, generator=g, sampler=o.sampler, stop=req.stop)
        for item in doc:
            if isinstance(item, str):
                if item:
                    handle.emit(TextDelta(i, item))
            else:
                handle.emit(ImageResult(i, item))
                self._count("images")
        self._finish(pipe, handle, i, None)

    def _run_image(self, pipe, handle, i, g) -> None:
        req, o = handle.request, handle.request.image
        w, h = o.size or (None, None)
        image = pipe.text_to_image(req.prompt, num_inference_steps=o.num_inference_steps,
                                   guidance_scale=o.guidance_scale,
                                   negative_prompt=o.negative_prompt, generator=g, height=h,
                                   width=w, progress=False, sampler=o.sampler)[0]
        handle.emit(ImageResult(i, image))
        self._count("images")
        self._count("prompt_tokens", handle.prompt_tokens)
        handle.emit(ChoiceDone(i, "stop", 0))

    # -- stats --------------------------------------------------------------------------------
    def _kv_slots(self) -> tuple[int, int]:
        """(used, total): the backend's KV-cache slots when it bounds them (the engine's static
        cache), else this scheduler's one sequence at a time."""
        pipe = self._pipe
        used, total = pipe.kv_slots() if pipe is not None else (0, None)
        if total is not None:
            return used, total
        return (1 if self._running is not None else 0), 1

    def stats(self) -> SchedulerStats:
        used, total = self._kv_slots()
        c, stages = self._snapshot()
        c = collections.Counter(c)
        with self._cv:
            depth, running = len(self._queue), int(self._running is not None)
        return SchedulerStats(
            scheduler=self.name, ready=self._health.ready, queue_depth=depth,
            max_queue=self.max_queue, running=running, kv_slots_used=used, kv_slots_total=total,
            tokens_per_second=self._rate.rate(), generated_tokens=c["generated_tokens"],
            prompt_tokens=c["prompt_tokens"], images_generated=c["images"],
            requests={k: c[k] for k in ("ok", "cancelled", "failed", "rejected")},
            stage_seconds=stages)
