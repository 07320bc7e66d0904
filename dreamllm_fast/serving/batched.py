"""`BatchedScheduler`: continuous batching of chat, interleaved and text-to-image requests.

One worker thread owns the pipeline's model. Requests wait in a bounded FIFO queue (`submit`
checks them first, exactly as the sequential scheduler does: serving/sequential.py
`prepare_request`). Every iteration of the worker (`_iteration`):

1. cancellations: a cancelled choice leaves the decode loop and closes its session, so its KV
   slot is free before anything else runs;
2. admission into free KV slots: each choice of a chat or interleaved request opens a session (a
   slot) for its whole life; a text-to-image request, and a negative prompt, hold one only for
   their condition pass (work.py `Request.wants`);
3. ONE prefill pass of at most `prefill_chunk` tokens, packing pieces of several passes (prompts,
   dream branches, image feedback, conditions: work.py `Prefill`): a long prompt takes one chunk
   per iteration, so every running sequence gets a token between two of its chunks;
4. ONE batched decode step over every running sequence through the project's one `DecodeLoop`
   (per-row sampling settings and Philox seeds); text streams through each request's handle with
   its stop strings applied; a `<dream_start>` pauses the sequence (it leaves the batch) and starts
   its dream branch;
5. ONE U-Net step over every image being drawn (`diffusion.denoise_step`: per-job timesteps,
   guidance scales and generators, [uncond; cond] rows), so text keeps streaming while images
   draw. A finished image is decoded (VAE) and sent; in an interleaved answer it is then encoded
   (CLIP) and fed back, and its sequence rejoins the decode batch.

Randomness equals the one-request pipeline's: choice i of a request with seed s owns
`torch.Generator(device).manual_seed(s + i)` (the model's device); a sampled sequence draws
its Philox key from it first, and its images' latents and DDPM noise come from it afterwards,
in the same order.

Failures: an exception in one request's own work (its CLIP encode, its image's VAE decode, ...)
fails that request (`RequestFailed`) and nothing else. A Python-level exception in a shared decode
step or U-Net call fails only the requests that cause it: each sequence (image) of the step is
tried alone and those whose own step raises fail, the others go on with unchanged results
(decoding.DecodeLoop.step, diffusion.denoise_step_isolated); when no single culprit shows, the step's
requests fail (the decode loop resets; sequences paused in a dream branch were not in the step:
they rejoin when their image is done). A packed prefill pass that raises fails its passes'
requests. Requests are validated before admission (protocol.py, sequential.prepare_request), so
this is the second line. The scheduler keeps serving,
unless the error leaves the GPU context unusable (a device-side assert, an illegal address:
`devices.device_failed`): then every request fails with 503, /health reports the scheduler
failed (Ray Serve replaces the replica) and the process should be restarted.

Stage seconds (/metrics) are host wall time around each stage, without device syncs (a sync would
stall the decode loop's run-ahead): on a GPU, time a stage waits for earlier queued work lands in
the stage that waits (the decode step's read of its ids).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from typing import Callable, Optional, Union

import torch

from ..decoding import DecodeLoop, State
from ..devices import device_failed
from ..diffusion import (DiffusionJob, decode_latents, denoise_step_isolated, make_scheduler,
                         prepare_latents, to_pil)
from ..errors import InvalidInputError
from ..sampling import draw_seed
from .scheduler import (ChoiceDone, GenerationRequest, Health, ImageResult, NotReadyError,
                        QueueFullError, RateMeter, RequestFailed, RequestHandle, SchedulerStats,
                        WorkerScheduler)
from .sequential import prepare_request
from .work import Choice, Prefill, Request

log = logging.getLogger("dreamllm_fast.serving")


class BatchedScheduler(WorkerScheduler):
    """load: a `DreamLLMPipeline` or a function returning one (called on the worker thread).

    max_batch: most sequences holding a KV slot at once; the engine's own slot count
    (`EngineConfig.max_batch`) bounds it too. prefill_chunk: tokens per prefill pass (default:
    the engine's chunk, so a pass is one captured bucket and a prompt's passes are the ones the
    pipeline runs; 512 on the reference backend). max_images: images denoised together.
    """

    name = "batched"
    _thread_name = "dreamllm-batched"

    def __init__(self, load: Union[Callable[[], object], object], *, max_queue: int = 64,
                 max_batch: int = 8, prefill_chunk: Optional[int] = None, max_images: int = 8,
                 warmup: bool = True):
        for what, v in (("max_queue", max_queue), ("max_batch", max_batch), ("max_images", max_images)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"{what} must be an integer >= 1, got {v!r}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool)
                                          or not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise InvalidInputError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self._init_worker(load)
        self.max_queue, self.max_batch, self.max_images = max_queue, max_batch, max_images
        self.prefill_chunk = prefill_chunk
        self._default_chunk = 512
        self.warmup = warmup
        self._queue: collections.deque[Request] = collections.deque()
        self._cancels: list[Request] = []
        # worker-owned state
        self._reqs: list[Request] = []  # admitted and not finished, in admission order
        self._prefills: list[Prefill] = []  # FIFO
        self._images: list[tuple[Choice, DiffusionJob]] = []  # FIFO; the first max_images draw
        self.loop: Optional[DecodeLoop] = None
        # stats
        self._rate = RateMeter()
        self._latency_ema = 1.0
        self._max_piece_chars = 64
        self._stats_lock = threading.Lock()
        self._counters = collections.Counter()
        self._stages: collections.Counter = collections.Counter()
        self._running = 0
        # test hooks: called at the start of every busy iteration; a list records what ran
        self.on_iteration: Optional[Callable[["BatchedScheduler"], None]] = None
        self.trace: Optional[list] = None

    # -- lifecycle ----------------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closing = True
            pending = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        self._refuse([r.handle for r in pending], "the server is shutting down; retry elsewhere")
        if self._thread is not None:
            self._thread.join(timeout)
        self._health = Health(False, "shut down")

    # -- admission (event-loop side) ------------------------------------------------------------
    async def submit(self, request: GenerationRequest) -> RequestHandle:
        self._check_ready()
        pipe = self._pipe
        prepared, pixels = await asyncio.to_thread(self._prepare, pipe, request)
        handle = RequestHandle(prepared.request, prepared.prompt_tokens)
        req = Request(handle, prepared, pixels)
        handle._on_cancel = lambda h: self._on_cancel(req)
        with self._cv:
            self._check_ready(closing_first=True)  # the worker may have stopped since
            # queued requests that free KV slots will take at the worker's next admission are
            # not waiting: a burst of max_queue + max_batch is served, not refused
            if len(self._queue) >= self.max_queue + max(0, self._free_slots()):
                self._count("rejected")
                wait = math.ceil(self._latency_ema * (len(self._queue) + 1) / self.max_batch)
                raise QueueFullError(
                    f"the request queue is full ({self.max_queue} waiting, up to {self.max_batch} "
                    f"sequences served together); retry after the Retry-After seconds or raise "
                    f"--max-queue", retry_after=min(60, max(1, wait)))
            self._queue.append(req)
            self._cv.notify()
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

    # -- the worker -------------------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            pipe = self._load()
            t0 = time.perf_counter()
            if self.warmup:
                pipe.chat([{"role": "user", "content": "warm-up"}], max_new_tokens=2)
                pipe.text_to_image("warm-up", num_inference_steps=1, progress=False)
            pipe.uncond_condition(None)  # the empty prompt's condition: a constant, cached now
            log.info("warm-up took %.2f s", time.perf_counter() - t0)
            self._max_piece_chars = max(8, max(len(t) for t in pipe.tokenizer.get_vocab()))
            self.loop = DecodeLoop(pipe.model, pipe.tokenizer, pipe.max_len, run_ahead=pipe.run_ahead)
            self._default_chunk = getattr(getattr(pipe.model, "prefill", None), "chunk", None) or 512
        except BaseException as e:  # noqa: BLE001 - reported through /health, never raised
            log.exception("loading the model failed")
            self._health = Health(False, f"loading the model failed: {type(e).__name__}: {e}",
                                  failed=True)
            return
        self._pipe = pipe
        sp = pipe.special
        self._stops = {"chat": (sp.eos, sp.bos, sp.dream_start), "interleaved": (sp.eos, sp.bos),
                       "completion": (sp.eos, sp.bos, sp.dream_start)}
        with self._cv:
            if self._closing:  # shut down while loading: never report ready
                return
            self._health = Health(True, "ready")
        why = "the scheduler's worker stopped"
        try:
            while True:
                with self._cv:
                    while not self._closing and not self._busy():
                        self._cv.wait(0.5)
                    if self._closing:
                        return
                    cancels, self._cancels = self._cancels, []
                try:
                    self._iteration(cancels)
                except Exception as e:  # noqa: BLE001 - a scheduler bug: fail what runs, go on
                    log.exception("scheduler iteration failed")
                    for r in list(self._reqs):
                        self._fail(r, e)
                    if device_failed(e):
                        self._broken = e
                if self._broken is not None:  # no later request can succeed in this process
                    e = self._broken
                    why = self._device_failed_detail(e)
                    log.error("%s", why)
                    return
        except BaseException as e:
            why = f"the scheduler's worker stopped ({type(e).__name__}: {e})"
            raise
        finally:
            if not self._closing:  # /health (and Ray's check_health) report it: replace this one
                self._health = Health(False, why, failed=True)
            self._teardown()

    def _busy(self) -> bool:
        """Work to do (called under the lock): cancellations, passes, sequences, images, or
        requests waiting while a slot is free."""
        if self._cancels or self._prefills or self._images or self._decoding():
            return True
        return bool(self._queue or any(r.wants() for r in self._reqs)) and self._free_slots() > 0

    def _teardown(self) -> None:
        err = NotReadyError("the server is shutting down; retry elsewhere" if self._closing else
                            f"{self._health.detail}; retry elsewhere")
        with self._cv:
            waiting = list(self._queue)
            self._queue.clear()
        for r in list(self._reqs) + waiting:
            if r not in self._reqs:
                self._reqs.append(r)
            self._fail(r, err, outcome="cancelled")
        if self.loop is not None:
            try:
                self.loop.close()
            except Exception:  # noqa: BLE001 - closing anyway
                log.exception("closing the decode loop failed")

    def _iteration(self, cancels: list[Request]) -> None:
        if self.on_iteration is not None:
            self.on_iteration(self)
        for r in cancels:
            if not r.finished:
                self._fail(r, None, outcome="cancelled")
        self._admit()
        self._prefill_pass()
        self._decode_step()
        self._image_step()
        self._running = sum(1 for r in self._reqs for c in r.choices if c.active)

    @property
    def _chunk(self) -> int:
        """Tokens per prefill pass: `prefill_chunk` (may be changed while serving: new passes
        take it), else the engine's chunk, else 512."""
        return self.prefill_chunk or self._default_chunk

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

    # -- prefill ----------------------------------------------------------------------------------
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
                elif hasattr(model, "extend_batch"):
                    outs = list(model.extend_batch(sessions, pieces))
                else:
                    outs = [s.extend(e) for s, e in zip(sessions, pieces)]
            else:
                rows = [p.piece_rows() for p in picked]
                if len(picked) == 1:
                    outs = [sessions[0].extend_dream(pieces[0], rows[0])]
                elif hasattr(model, "condition_pair"):
                    outs = model.condition_pair(sessions, pieces, rows)
                else:
                    outs = [s.extend_dream(e, r) for s, e, r in zip(sessions, pieces, rows)]
        except Exception as e:  # noqa: BLE001 - a shared pass: every request in it fails
            for p in picked:
                self._fail(p.req, e)
            return
        finally:
            self._stage(picked[0].stage if kind == "extend" else "condition", t0)
        if self.trace is not None:
            self.trace.append(("prefill", [(p.req.handle.request_id, p.label, b - a)
                                           for p, (a, b) in zip(picked, map(Prefill.next_piece, picked))]))
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
                              tag=c)
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

    # -- decode -----------------------------------------------------------------------------------
    def _decoding(self) -> bool:
        return self.loop is not None and (self.loop.has_events or any(
            s.state in (State.WAITING, State.RUNNING) for s in self.loop.seqs))

    def _loop_call(self, fn):
        """Run a DecodeLoop call; if it raises, the loop has reset itself (every sequence it held
        ended with "error"): fail the requests of the sequences that were in the step, and mark
        the ones paused in a dream branch to rejoin as new sequences when their image is done."""
        paused = {id(s) for s in self.loop.seqs if s.state is State.PAUSED}
        live = {id(s) for s in self.loop.seqs if s.state in (State.WAITING, State.RUNNING)}
        try:
            return fn(), None
        except Exception as e:  # noqa: BLE001 - a shared step failed
            log.exception("a decode step failed; failing the sequences in it")
            if device_failed(e):
                self._broken = e  # the worker stops after this iteration
            for r in list(self._reqs):
                for c in r.choices:
                    if c.seq is None or c.done:
                        continue
                    if id(c.seq) in paused:  # drawing its image: not in the step
                        c.rejoin = True
                    elif id(c.seq) in live:  # in the step (or being finished by `fn`)
                        self._fail(r, e)
                        break
            return None, e

    def _decode_step(self) -> None:
        if not self._decoding():
            return
        t0 = time.perf_counter()
        events, err = self._loop_call(self.loop.step)
        self._stage("decode", t0)
        if err is not None:
            return
        tokens, got = 0, []
        for ev in events:
            c: Choice = ev.seq.tag
            if c is None or c.done:
                continue
            if ev.reason == "error":  # its own step raised; the others went on (DecodeLoop.step)
                self._fail(c.req, ev.seq.error)
                continue
            if ev.token is not None:
                tokens += 1
                got.append((c.req.handle.request_id, c.index))
            if ev.kind == "finish":  # the last text rides on ChoiceDone
                self._complete(c, None, ev.text)
            elif ev.text and c.text(ev.text):  # a stop string: the choice ends here
                self._finish_seq(c, "stop")
            elif ev.kind == "pause":
                self._pause(c)
        self._rate.add(tokens)
        if self.trace is not None:
            self.trace.append(("decode", got))

    def _finish_seq(self, c: Choice, reason: str) -> None:
        seq = c.seq
        self._loop_call(lambda: self.loop.finish(seq, reason))
        if not c.done:
            self._complete(c, "stop" if reason == "stop" else None)

    def _pause(self, c: Choice) -> None:
        """`<dream_start>`: the sequence left the batch; draw its image unless it may not."""
        c.flush()  # a stop string cannot span an image
        pipe, r = self._pipe, c.req
        Q, P = pipe.model.dream_queries.shape[0], pipe.config.vision.num_patches
        if c.images >= r.request.image.max_images:
            self._finish_seq(c, "max_images")
        elif c.session.length + Q + P + 4 > pipe.max_len:  # the dream and image spans must fit
            self._finish_seq(c, "context")
        else:
            c.phase = "dream"
            self._prefills.append(Prefill(r, c, c.session, pipe.dream_embeds(), self._chunk,
                                          self._dreamed, rows=list(range(1, Q + 1)),
                                          stage="condition", label="dream"))

    def _dreamed(self, p: Prefill, cond: torch.Tensor) -> None:
        self._draw(p.choice, cond, self._pipe.latent_shape(None, None))

    # -- images -----------------------------------------------------------------------------------
    def _draw(self, c: Choice, cond: torch.Tensor, shape) -> None:
        """A condition [Q, C] -> this choice's diffusion job (latents drawn from its generator)."""
        pipe, o = self._pipe, c.req.request.image
        uncond = c.req.uncond if c.req.uncond is not None else pipe.uncond_condition(None)
        lat = prepare_latents((1,) + tuple(shape), cond.dtype, pipe.model.device, c.generator, None)
        job = DiffusionJob(make_scheduler(pipe.config.diffusion.scheduler), cond[None], uncond[None],
                           o.guidance_scale, o.num_inference_steps, lat, c.generator)
        self._images.append((c, job))
        c.phase = "diffuse"

    def _image_step(self) -> None:
        """One U-Net step for the first `max_images` images (one call per latent shape), then the
        VAE for those that took their last step."""
        if not self._images:
            return
        active = self._images[:self.max_images]
        groups: dict = {}
        for c, job in active:
            groups.setdefault((tuple(job.latents.shape), job.latents.dtype), []).append((c, job))
        t0 = time.perf_counter()
        for group in groups.values():
            # a Python-level error fails only the images that cause it (each retried alone)
            for i, e in denoise_step_isolated(self._pipe.unet, [job for _, job in group]):
                self._fail(group[i][0].req, e)
        self._stage("diffuse", t0)
        if self.trace is not None:
            self.trace.append(("unet", [(c.req.handle.request_id, c.index, job.index)
                                        for c, job in active if not c.done]))
        for c, job in active:
            if job.done and not c.done:
                self._images.remove((c, job))
                try:
                    self._image_done(c, job)
                except Exception as e:  # noqa: BLE001 - this request's own work
                    self._fail(c.req, e)

    def _image_done(self, c: Choice, job: DiffusionJob) -> None:
        pipe, r = self._pipe, c.req
        t0 = time.perf_counter()
        pil = to_pil(decode_latents(pipe.vae_decode, job.latents, pipe.config.diffusion.vae_scaling_factor))[0]
        self._stage("decode_latents", t0)
        r.handle.emit(ImageResult(c.index, pil))
        self._count("images")
        if r.kind == "image":
            self._complete(c, "stop")
            return
        c.images += 1
        t0 = time.perf_counter()
        feats = pipe.model.encode_images(pipe.preprocess([pil]))[0]
        self._stage("encode", t0)
        c.phase = "feedback"
        self._prefills.append(Prefill(r, c, c.session, pipe.feedback_embeds(feats), self._chunk,
                                      self._fed_back, label="feedback"))

    def _fed_back(self, p: Prefill, logits: torch.Tensor) -> None:
        """The image is in the cache: the sequence resumes (or rejoins after a loop reset)."""
        c, r = p.choice, p.req
        c.phase = "decode"
        if not c.rejoin:
            self.loop.resume(c.seq, logits)
            return
        c.prior += c.seq.token_ids
        c.rejoin = False
        left = r.request.sampling.max_new_tokens - len(c.prior)
        if left < 1:
            c.seq = None
            self._complete(c, None)
            return
        sp = r.request.sampling
        params = type(sp)(max_new_tokens=left, do_sample=sp.do_sample, temperature=sp.temperature,
                          top_k=sp.top_k, top_p=sp.top_p)
        c.seq = self.loop.add(c.session, logits, params, c.philox, stop_ids=self._stops[r.kind],
                              pause_ids=(self._pipe.special.dream_start,), tag=c)

    # -- endings ----------------------------------------------------------------------------------
    def _complete(self, c: Choice, reason: Optional[str], last: str = "") -> None:
        """A choice is done: ChoiceDone with its last text (`last` through its stop strings, and
        what they held back), and its slot back at once."""
        if c.done:
            return
        text, hit = c.final_text(last)
        if hit:
            reason = "stop"
        ids = c.token_ids()
        if reason is None:  # as the sequential scheduler reports it: a stop id, or a limit
            sp = self._pipe.special
            reason = "stop" if ids and ids[-1] in (sp.eos, sp.bos, sp.dream_start) else "length"
        r = c.req
        self._count("generated_tokens", len(ids))
        self._count("prompt_tokens", r.handle.prompt_tokens)
        r.handle.emit(ChoiceDone(c.index, reason, len(ids), text))
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

    # -- stats ------------------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counters[key] += n

    def _stage(self, name: str, t0: float) -> None:
        with self._stats_lock:
            self._stages[name] += time.perf_counter() - t0

    def kv_slots(self) -> tuple[int, int]:
        if self._pipe is None:
            return 0, self.max_batch
        used, total = self._pipe.kv_slots()
        return used, (self.max_batch if total is None else min(total, self.max_batch))

    def phases(self) -> list[tuple[str, int, str]]:
        """(request id, choice, phase) of every admitted choice (tests and debugging): phase is
        one of pending, prefill, decode, dream, diffuse, feedback, done."""
        return [(r.handle.request_id, c.index, c.phase) for r in list(self._reqs) for c in r.choices]

    def stats(self) -> SchedulerStats:
        used, total = self.kv_slots()
        with self._cv:
            depth = len(self._queue)
        with self._stats_lock:
            c, stages = dict(self._counters), dict(self._stages)
        return SchedulerStats(
            scheduler=self.name, ready=self._health.ready, queue_depth=depth,
            max_queue=self.max_queue, running=self._running, kv_slots_used=used,
            kv_slots_total=total, tokens_per_second=self._rate.rate(),
            generated_tokens=c.get("generated_tokens", 0), prompt_tokens=c.get("prompt_tokens", 0),
            images_generated=c.get("images", 0),
            requests={k: c.get(k, 0) for k in ("ok", "cancelled", "failed", "rejected")},
            stage_seconds=stages)


def serving_engine_config(max_batch: int, device=None, dtype=None):
    """The engine's runtime knobs for serving `max_batch` sequences at once: that many KV slots,
    and decode graphs captured at 1, 2, 4, ... up to `max_batch` (a step of b sequences replays
    the smallest captured size >= b, its spare rows padding). At 7B and a 2048-token context each
    slot holds 1 GiB of bf16 KV cache."""
    from ..config import EngineConfig
    from ..pipeline import resolve_device_dtype

    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidInputError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    sizes = {1 << i for i in range(max_batch.bit_length())} | {max_batch}
    return EngineConfig(max_batch=max_batch, precision=resolve_device_dtype(device, dtype)[1],
                        cuda_graph_batch_sizes=tuple(sorted(s for s in sizes if s <= max_batch)))


def _query_rows(prompt, pipe) -> list[int]:
    """The dream query rows of a text-to-image (or negative) prompt: its last Q positions."""
    s, Q = prompt.dream_slots[-1], pipe.model.dream_queries.shape[0]
    return list(range(s, s + Q))
