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

import asyncio
import collections
import dataclasses
import logging
import math
import time
from typing import Callable, Optional, Union

import torch

from ..devices import device_failed
from ..diffusion import check_diffusion_args, max_inference_steps
from ..errors import ContextOverflowError, InvalidInputError
from ..prompt import Prompt, PromptBuilder
from .scheduler import (ChoiceDone, GenerationRequest, Health, ImageResult,
                        QueueFullError, RateMeter, RequestFailed, RequestHandle, SchedulerStats,
                        StopStrings, WorkerScheduler, emit_text)

log = logging.getLogger("dreamllm_fast.serving")


class SequentialScheduler(WorkerScheduler):
    """load: a `DreamLLMPipeline`, or a function returning one (called on the worker thread, so
    the server answers /health with 503 while the weights load)."""

    name = "sequential"
    _thread_name = "dreamllm-sequential"

    def __init__(self, load: Union[Callable[[], object], object], *, max_queue: int = 64,
                 warmup: bool = True):
        if not isinstance(max_queue, int) or max_queue < 1:
            raise InvalidInputError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self._init_worker(load)
        self.max_queue = max_queue
        self.warmup = warmup
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._running: Optional[RequestHandle] = None
        self._rate = RateMeter()
        self._latency_ema = 1.0  # seconds per request, for Retry-After
        self._max_piece_chars = 64
        self._counters = collections.Counter()
        self._stages: collections.Counter = collections.Counter()

    # -- lifecycle ----------------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closing = True
            pending = list(self._queue)
            self._queue.clear()
            running = self._running
            self._cv.notify_all()
        self._refuse(pending, "the server is shutting down; retry elsewhere")
        if running is not None:
            running.cancel()
        if self._thread is not None:
            self._thread.join(timeout)
        self._health = Health(False, "shut down")

    # -- admission ----------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest) -> RequestHandle:
        self._check_ready()
        pipe = self._pipe
        request, prompt_tokens = await asyncio.to_thread(self._prepare, pipe, request)
        handle = RequestHandle(request, prompt_tokens)
        handle._on_cancel = self._dequeue
        with self._cv:
            self._check_ready(closing_first=True)  # the worker may have stopped since
            # the head of the queue is not waiting when the worker is free to take it
            if len(self._queue) >= self.max_queue + (self._running is None):
                self._counters["rejected"] += 1
                wait = math.ceil(self._latency_ema * (len(self._queue) + 1))
                raise QueueFullError(
                    f"the request queue is full ({self.max_queue} waiting, one request served at "
                    f"a time); retry after the Retry-After seconds or raise --max-queue",
                    retry_after=min(60, max(1, wait)))
            self._queue.append(handle)
            self._cv.notify()
        return handle

    def _dequeue(self, handle: RequestHandle) -> None:
        with self._cv:
            if handle in self._queue:  # still waiting: its place frees at once
                self._queue.remove(handle)
                self._counters["cancelled"] += 1
                handle.close()

    def _prepare(self, pipe, req: GenerationRequest) -> tuple[GenerationRequest, int]:
        """Checks before queueing; returns the request with max_new_tokens resolved, and the
        prompt length in tokens (image spans included)."""
        p = prepare_request(pipe, req, self._max_piece_chars)
        return p.request, p.prompt_tokens

    # -- the worker ---------------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            pipe = self._load()
            if self.warmup:
                t0 = time.perf_counter()
                pipe.chat([{"role": "user", "content": "warm-up"}], max_new_tokens=2)
                pipe.text_to_image("warm-up", num_inference_steps=1, progress=False)
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
                self._stages.update(pipe.last_timings)
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
            self._counters[outcome] += 1
            self._latency_ema = 0.8 * self._latency_ema + 0.2 * (time.monotonic() - t0)

    def _finish(self, pipe, handle, i: int, reason: Optional[str]) -> None:
        ids = pipe.last_token_ids()
        sp = pipe.special
        if reason is None:  # the walk ended on its own: a stop token, or the token/context limit
            reason = "stop" if ids and ids[-1] in (sp.eos, sp.bos, sp.dream_start) else "length"
        self._counters_tokens(len(ids), handle.prompt_tokens)
        handle.emit(ChoiceDone(i, reason, len(ids)))

    def _counters_tokens(self, generated: int, prompt: int) -> None:
        self._rate.add(generated)
        self._counters["generated_tokens"] += generated
        self._counters["prompt_tokens"] += prompt

    def _run_chat(self, pipe, handle, i, g) -> None:
        req, sp = handle.request, handle.request.sampling
        stop = StopStrings(req.stop)
        it = pipe.chat(req.messages, max_new_tokens=sp.max_new_tokens, do_sample=sp.do_sample,
                       temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, stream=True,
                       generator=g)
        reason = None
        try:
            for piece in it:
                if emit_text(handle, i, stop, piece):
                    reason = "stop"
                    break
                if handle.cancelled:
                    reason = "cancelled"
                    break
        finally:
            it.close()  # closes the session: its KV slot is free before the next request
        emit_text(handle, i, stop)
        self._finish(pipe, handle, i, reason)

    def _run_completion(self, pipe, handle, i, g) -> None:
        req, sp = handle.request, handle.request.sampling
        doc = pipe.complete(req.content, max_new_tokens=sp.max_new_tokens, max_images=0,
                            do_sample=sp.do_sample, temperature=sp.temperature, top_p=sp.top_p,
                            top_k=sp.top_k, generator=g)
        stop = StopStrings(req.stop)
        reason = "stop" if doc and emit_text(handle, i, stop, doc[0]) else None
        emit_text(handle, i, stop)
        self._finish(pipe, handle, i, reason)

    def _run_interleaved(self, pipe, handle, i, g) -> None:
        req, sp, o = handle.request, handle.request.sampling, handle.request.image
        doc = pipe.generate(req.messages, max_new_tokens=sp.max_new_tokens, max_images=o.max_images,
                            num_inference_steps=o.num_inference_steps,
                            guidance_scale=o.guidance_scale, negative_prompt=o.negative_prompt,
                            do_sample=sp.do_sample, temperature=sp.temperature, top_p=sp.top_p,
                            top_k=sp.top_k, generator=g)
        stop = StopStrings(req.stop)
        reason = None
        for item in doc:
            if isinstance(item, str):
                if emit_text(handle, i, stop, item):
                    reason = "stop"
                    break
            else:
                emit_text(handle, i, stop)  # a stop string cannot span an image
                handle.emit(ImageResult(i, item))
                self._counters["images"] += 1
        emit_text(handle, i, stop)
        self._finish(pipe, handle, i, reason)

    def _run_image(self, pipe, handle, i, g) -> None:
        req, o = handle.request, handle.request.image
        w, h = o.size or (None, None)
        image = pipe.text_to_image(req.prompt, num_inference_steps=o.num_inference_steps,
                                   guidance_scale=o.guidance_scale,
                                   negative_prompt=o.negative_prompt, generator=g, height=h,
                                   width=w, progress=False)[0]
        handle.emit(ImageResult(i, image))
        self._counters["images"] += 1
        self._counters["prompt_tokens"] += handle.prompt_tokens
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
        c = self._counters
        with self._cv:
            depth, running = len(self._queue), int(self._running is not None)
        return SchedulerStats(
            scheduler=self.name, ready=self._health.ready, queue_depth=depth,
            max_queue=self.max_queue, running=running, kv_slots_used=used, kv_slots_total=total,
            tokens_per_second=self._rate.rate(), generated_tokens=c["generated_tokens"],
            prompt_tokens=c["prompt_tokens"], images_generated=c["images"],
            requests={k: c[k] for k in ("ok", "cancelled", "failed", "rejected")},
            stage_seconds=dict(self._stages))


@dataclasses.dataclass
class Prepared:
    """A request checked against the model, with what the checks built (the worker reuses it)."""

    request: GenerationRequest  # max_new_tokens resolved
    prompt_tokens: int  # image spans included
    prompt: Prompt  # the chat prompt, or the text-to-image prompt with its dream query slots
    negative: Optional[Prompt] = None  # the built negative prompt (images, interleaved)


def prepare_request(pipe, req: GenerationRequest, max_piece_chars: int) -> Prepared:
    """Everything `submit` checks before queueing (both schedulers): prompt length against the
    context (images included), max_new_tokens resolved, diffusion settings, the image size."""
    # A builder per call: the worker builds prompts with the pipeline's own builder meanwhile.
    builder = PromptBuilder(pipe.tokenizer, pipe.config, pipe.special)
    max_len = pipe.max_len
    span = pipe.config.image_span_len
    negative = None
    if req.kind in ("chat", "interleaved", "completion"):
        contents = [req.content] if req.kind == "completion" else \
            [m.get("content") for m in req.messages]
        texts = [c for content in contents for c in _texts(content)]
        n_img = sum(1 for content in contents for c in _items(content)
                    if not isinstance(c, (str, dict)))
        # Every token covers at most max_piece_chars characters: far too much text fails
        # here, before the (slow) tokenizer sees megabytes.
        if sum(map(len, texts)) > max_len * max_piece_chars or n_img * span > max_len:
            raise ContextOverflowError(_overflow_msg(max_len, None, n_img, span, req.max_new_tokens))
        prompt = builder.raw(req.content) if req.kind == "completion" else builder.chat(req.messages)
        n_prompt = len(prompt)
        if req.max_new_tokens is None:
            if n_prompt >= max_len:
                raise ContextOverflowError(
                    _overflow_msg(max_len, n_prompt, len(prompt.images), span, None))
            max_new = max_len - n_prompt
        else:
            max_new = req.max_new_tokens
            if n_prompt + max_new > max_len:
                raise ContextOverflowError(
                    _overflow_msg(max_len, n_prompt, len(prompt.images), span, max_new))
        req = dataclasses.replace(req, max_new_tokens=max_new,
                                  sampling=dataclasses.replace(req.sampling, max_new_tokens=max_new))
    else:
        if len(req.prompt or "") > max_len * max_piece_chars:
            raise ContextOverflowError(_overflow_msg(max_len, None, 0, span, None, "prompt"))
        prompt = builder.raw(req.prompt or "", dream_queries=True)
        n_prompt = len(prompt)
        if n_prompt > max_len:
            raise ContextOverflowError(_overflow_msg(max_len, n_prompt, 0, span, None, "prompt"))
        _check_size(pipe, req.image.size)
    if req.kind in ("interleaved", "image"):
        o = req.image
        check_diffusion_args(o.num_inference_steps, o.guidance_scale,
                             max_inference_steps(pipe.config.diffusion.scheduler))
        if not isinstance(o.max_images, int) or o.max_images < 0:
            raise InvalidInputError(f"max_images must be an integer >= 0, got {o.max_images!r}")
        if o.negative_prompt is not None:
            negative = builder.raw(o.negative_prompt, dream_queries=True)
            if len(negative) > max_len:
                raise ContextOverflowError(
                    f"negative_prompt is {len(negative)} tokens; the context holds {max_len}")
    return Prepared(req, n_prompt, prompt, negative)


def image_size_limits(config) -> tuple[int, int, int]:
    """(step, smallest, largest) side in pixels that this model's VAE and U-Net accept.

    step: the VAE's factor times the U-Net's downsampling (2 per down block after the first), so
    every U-Net level halves exactly (SD-2.1: 8 x 8 = 64; the tiny test model: 8 x 2 = 16).
    smallest: half the native size (SD-2.1-base: 256, DALL-E 2's smallest size) and never under
    2 steps: at one step the U-Net's bottom level is 1x1 and its GroupNorm fails ("Expected more
    than 1 value per channel", found by a hostile-client audit with "8x8"). largest: twice the
    native size (SD-2.1-base: 1024)."""
    d = config.diffusion
    step = d.vae_scale_factor * 2 ** max(0, len(d.unet.get("down_block_types", ())) - 1)
    native = d.default_resolution
    lo = max(2 * step, -(-native // 2 // step) * step)
    return step, lo, 2 * native


def _check_size(pipe, size) -> None:
    if size is None:
        return
    step, lo, hi = image_size_limits(pipe.config)
    native = pipe.config.diffusion.default_resolution
    for name, v in zip(("width", "height"), size):
        if v < lo or v > hi or v % step:
            raise InvalidInputError(
                f"size: {name} must be a multiple of {step} in [{lo}, {hi}] for this model (its "
                f"native size is {native}x{native}), got {v}")


def _items(content) -> list:
    if content is None:
        return []
    return list(content) if isinstance(content, (list, tuple)) else [content]


def _texts(content) -> list[str]:
    return [c for c in _items(content) if isinstance(c, str)]


def _overflow_msg(max_len: int, n_prompt: Optional[int], n_img: int, span: int,
                  max_new: Optional[int], what: str = "messages") -> str:
    """OpenAI's wording, with the numbers: the limit, the prompt (images included) and the ask."""
    got = "far more than that" if n_prompt is None else f"{n_prompt} tokens"
    imgs = f", including {n_img} image(s) of {span} tokens each" if n_img else ""
    ask = "" if max_new is None else f" + {max_new} requested in max_tokens"
    return (f"This model's maximum context length is {max_len} tokens. However, the {what} "
            f"take {got}{imgs}{ask}. Shorten the {what}"
            + (", pass fewer images" if what == "messages" else "")
            + (", or lower max_tokens." if max_new is not None else "."))
