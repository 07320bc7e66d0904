"""`BatchedScheduler`: continuous batching of chat, interleaved and text-to-image requests.

One worker thread owns the pipeline's model. Requests wait in a bounded FIFO queue (`submit`
checks them first, exactly as the sequential scheduler does). Every iteration of the worker
(`_iteration`) reads cancel -> admit -> prefill -> decode -> draw, each stage in its own module:

1. cancellations: a cancelled choice leaves the decode loop and closes its session, so its KV
   slot is free before anything else runs;
2. admission into free KV slots (serving/admission.py): each choice of a chat or interleaved request opens a session (a
   slot) for its whole life; a text-to-image request, and a negative prompt, hold one only for
   their condition pass (work.py `Request.wants`);
3. ONE prefill pass (serving/prefill_pass.py) of at most `prefill_chunk` tokens, packing pieces of several passes (prompts,
   dream branches, image feedback, conditions: work.py `Prefill`): a long prompt takes one chunk
   per iteration, so every running sequence gets a token between two of its chunks;
4. ONE batched decode step over every running sequence through the project's one `DecodeLoop`
   (per-row sampling settings and Philox seeds); text streams through each request's handle (the
   loop applies stop strings); a `<dream_start>` pauses the sequence (it leaves the batch) and starts
   its dream branch;
5. ONE U-Net step (serving/image_steps.py) over every image being drawn (`diffusion.denoise_step`: per-job timesteps,
   guidance scales and generators, [uncond; cond] rows), so text keeps streaming while images
   draw. A finished image is decoded (VAE) and sent; in an interleaved answer it is then encoded
   (CLIP) and fed back, and its sequence rejoins the decode batch.

Randomness equals the one-request pipeline's: choice i of a request with seed s owns
`torch.Generator(device).manual_seed(s + i)` (the model's device); a sampled sequence draws
its Philox key from it first, and its images' latents and DDPM noise come from it afterwards,
in the same order.

Endings (serving/outcomes.py). Failures: an exception in one request's own work (its CLIP encode, its image's VAE decode, ...)
fails that request (`RequestFailed`) and nothing else. A Python-level exception in a shared decode
step or U-Net call fails only the requests that cause it: each sequence (image) of the step is
tried alone and those whose own step raises fail, the others go on with unchanged results
(decoding.DecodeLoop.step, diffusion.denoise_step_isolated); when no single culprit shows, the step's
requests fail (the decode loop resets; sequences paused in a dream branch were not in the step:
they rejoin when their image is done). A packed prefill pass that raises fails its passes'
requests. Requests are validated before admission (protocol.py, admission.prepare_request), so
this is the second line. The scheduler keeps serving,
unless the error leaves the GPU context unusable (a device-side assert, an illegal address:
`devices.device_failed`): then every request fails with 503, /health reports the scheduler
failed (Ray Serve replaces the replica) and the process should be restarted.

Stage seconds (/metrics) are host wall time around each stage, without device syncs (a sync would
stall the decode loop's run-ahead): on a GPU, time a stage waits for earlier queued work lands in
the stage that waits (the decode step's read of its ids).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Union

from ..decoding import DecodeLoop, State
from ..devices import device_failed
from ..diffusion import DiffusionJob
from ..errors import InvalidInputError
from .admission import Admission
from .image_steps import ImageSteps
from .outcomes import Outcomes
from .prefill_pass import PrefillPasses
from .scheduler import Health, NotReadyError, SchedulerStats
from .worker import WorkerScheduler
from .work import Choice, Prefill, Request

log = logging.getLogger("dreamllm_fast.serving")


class BatchedScheduler(Admission, PrefillPasses, ImageSteps, Outcomes, WorkerScheduler):
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
                 warmup: bool = True, observer: Optional["Observer"] = None):
        for what, v in (("max_batch", max_batch), ("max_images", max_images)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"{what} must be an integer >= 1, got {v!r}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool)
                                          or not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise InvalidInputError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self._init_worker(load, max_queue, warmup)
        self.max_batch, self.max_images = max_batch, max_images
        self._parallel = max_batch
        self.prefill_chunk = prefill_chunk
        self._default_chunk = 512
        self.observer = observer
        self._cancels: list[Request] = []
        # worker-owned state (the queue holds `Request`s)
        self._reqs: list[Request] = []  # admitted and not finished, in admission order
        self._prefills: list[Prefill] = []  # FIFO
        self._images: list[tuple[Choice, DiffusionJob]] = []  # FIFO; the first max_images draw
        self.loop: Optional[DecodeLoop] = None
        self._running = 0

    @staticmethod
    def _handle_of(queued: Request):
        return queued.handle

    def _observe(self, stage: str, entries: list) -> None:
        if self.observer is not None:
            self.observer.ran(stage, entries)

    # -- the worker -------------------------------------------------------------------------------
    def _warmed(self, pipe) -> None:
        pipe.uncond_condition(None)  # the empty prompt's condition: a constant, cached now
        self.loop = DecodeLoop(pipe.model, pipe.tokenizer, pipe.max_len, run_ahead=pipe.run_ahead)
        self._default_chunk = pipe.model.prefill_chunk
        sp = pipe.special
        self._stops = {"chat": (sp.eos, sp.bos, sp.dream_start), "interleaved": (sp.eos, sp.bos),
                       "completion": (sp.eos, sp.bos, sp.dream_start)}

    def _serve(self, pipe) -> None:
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
        if self.observer is not None:
            self.observer.iteration(self)
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
            if ev.kind == "finish":
                if ev.reason == "stop" and ev.token not in ev.seq.stop_ids:
                    # a stop string ended it: the text before it streams, then an empty ChoiceDone
                    c.emit(ev.text)
                    self._complete(c, "stop")
                else:  # a stop id or a limit: the last text rides on ChoiceDone (vLLM's last chunk)
                    self._complete(c, "stop" if ev.reason == "stop" else None, ev.text)
                continue
            c.emit(ev.text)
            if ev.kind == "pause":
                self._pause(c)
        self._rate.add(tokens)
        self._observe("decode", got)

    def _finish_seq(self, c: Choice, reason: str) -> None:
        """End a paused sequence the scheduler declines to resume (`reason`: why)."""
        seq = c.seq
        self._loop_call(lambda: self.loop.finish(seq, reason))
        if not c.done:
            self._complete(c, None)

    # -- stats ------------------------------------------------------------------------------------
    def kv_slots(self) -> tuple[int, int]:
        if self._pipe is None:
            return 0, self.max_batch
        used, total = self._pipe.kv_slots()
        return used, (self.max_batch if total is None else min(total, self.max_batch))

    def phases(self) -> list[tuple[str, int, str]]:
        """What the worker is doing, like `stats()` a read-only view from any thread: (request id,
        choice, phase) of every admitted choice, phase one of pending, prefill, decode, dream,
        diffuse, feedback, done (a snapshot: the worker moves on meanwhile)."""
        return [(r.handle.request_id, c.index, c.phase) for r in list(self._reqs) for c in r.choices]

    def stats(self) -> SchedulerStats:
        used, total = self.kv_slots()
        with self._cv:
            depth = len(self._queue)
        c, stages = self._snapshot()
        return SchedulerStats(
            scheduler=self.name, ready=self._health.ready, queue_depth=depth,
            max_queue=self.max_queue, running=self._running, kv_slots_used=used,
            kv_slots_total=total, tokens_per_second=self._rate.rate(),
            generated_tokens=c.get("generated_tokens", 0), prompt_tokens=c.get("prompt_tokens", 0),
            images_generated=c.get("images", 0),
            requests={k: c.get(k, 0) for k in ("ok", "cancelled", "failed", "rejected")},
            stage_seconds=stages)


class Observer:
    """What the worker ran, for tests and tracing, injected at construction: `iteration(sched)` at
    the start of every busy iteration (a test may hold or slow the worker there), `ran(stage,
    entries)` after each stage: ("prefill", [(request id, pass label, tokens)]), ("decode",
    [(request id, choice)]), ("unet", [(request id, choice, step)])."""

    def iteration(self, sched: "BatchedScheduler") -> None:
        pass

    def ran(self, stage: str, entries: list) -> None:
        pass


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
