"""Admission into the batched scheduler (serving/batched.py): checks, the queue, KV slots.

`prepare_request` checks a request against the model before it queues (both schedulers use it:
prompt length against the context, sampling and diffusion settings, image sizes). `submit`
(worker.py) runs `Admission._prepare` off the loop thread (the checks, and the request's images
preprocessed off the worker thread), then queues the `Request` of `_queue_item`; a full queue
refuses at once (429). On the worker, `_admit` starts work
FIFO while KV slots are free: each choice of a chat or interleaved request opens a session (a
slot) for its whole life; a text-to-image request, and a negative prompt, hold one only for their
condition pass (work.py `Request.wants`). Starting a part queues its first prefill pass
(serving/prefill_pass.py).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import torch

from ..detokenize import StopStrings
from ..diffusion import check_diffusion_args, max_inference_steps
from ..errors import ContextOverflowError, InvalidInputError
from ..prompt import Prompt, PromptBuilder
from ..sampling import draw_seed
from .scheduler import GenerationRequest, RequestHandle
from .work import Prefill, Request

log = logging.getLogger("dreamllm_fast.serving")


class Admission:
    """The admission methods of `BatchedScheduler` (its state is declared in its __init__)."""

    def _prepare(self, pipe, request: GenerationRequest):
        p = prepare_request(pipe, request, self._max_piece_chars)
        # CLIP preprocessing (resize, crop, normalize) here, off the worker thread
        pixels = pipe.preprocess(p.prompt.images) if p.prompt.images else None
        return p, pixels

    def _queue_item(self, prepared) -> Request:
        p, pixels = prepared
        handle = RequestHandle(p.request, p.prompt_tokens)
        req = Request(handle, p, pixels)
        handle._on_cancel = lambda h: self._on_cancel(req)
        return req

    def _spare(self) -> int:
        # queued requests that free KV slots will take at the worker's next admission are not
        # waiting: a burst of max_queue + max_batch is served, not refused
        return self._free_slots()

    @property
    def _served(self) -> str:
        return f"up to {self.max_batch} sequences served together"

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


@dataclasses.dataclass
class Prepared:
    """A request checked against the model, with what the checks built (the worker reuses it)."""

    request: GenerationRequest  # max_new_tokens resolved
    prompt_tokens: int  # image spans included
    prompt: Prompt  # the chat prompt, or the text-to-image prompt with its dream query slots
    negative: Optional[Prompt] = None  # the built negative prompt (images, interleaved)


def prepare_request(pipe, req: GenerationRequest, max_piece_chars: int) -> Prepared:
    """Everything `submit` checks before queueing (both schedulers): prompt length against the
    context (images included), max_new_tokens resolved, stop strings, diffusion settings, the
    image size."""
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
        req = dataclasses.replace(req, max_new_tokens=max_new, stop=tuple(StopStrings(req.stop).stops),
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
