"""The batched scheduler's images (serving/batched.py): dream branches, U-Net steps, feedback.

A `<dream_start>` pauses a sequence (it leaves the decode batch) and queues its dream branch (the
64 queries, a prefill pass); the condition starts a diffusion job. Every iteration runs ONE U-Net
step over the first `max_images` images (`diffusion.denoise_step_isolated`: per-job timesteps,
guidance scales and generators, [uncond; cond] rows), so text keeps streaming while images draw.
A finished image is decoded (VAE) and sent; in an interleaved answer it is then encoded (CLIP) and
fed back (a prefill pass), and its sequence resumes.
"""
from __future__ import annotations

import time

import torch

from ..diffusion import (DiffusionJob, decode_latents, denoise_step_isolated, make_noise_scheduler,
                         prepare_latents, to_pil)
from .progress import progress_event
from .scheduler import ImageResult
from .work import Choice, Prefill


class ImageSteps:
    """The image methods of `BatchedScheduler` (its state is declared in its __init__)."""

    def _pause(self, c: Choice) -> None:
        """`<dream_start>`: the sequence left the batch; draw its image unless it may not."""
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


    def _draw(self, c: Choice, cond: torch.Tensor, shape) -> None:
        """A condition [Q, C] -> this choice's diffusion job (latents drawn from its generator)."""
        pipe, o = self._pipe, c.req.request.image
        uncond = c.req.uncond if c.req.uncond is not None else pipe.uncond_condition(None)
        lat = prepare_latents((1,) + tuple(shape), cond.dtype, pipe.model.device, c.generator, None)
        job = DiffusionJob(make_noise_scheduler(pipe.config.diffusion.scheduler, o.sampler),
                           cond[None], uncond[None],
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
        whole_step = self._pipe.stepper is not None  # its captured step takes one sampler (DDPM)
        for c, job in active:
            key = (tuple(job.latents.shape), job.latents.dtype) + ((job.sampler,) if whole_step else ())
            groups.setdefault(key, []).append((c, job))
        t0 = time.perf_counter()
        for group in groups.values():
            # a Python-level error fails only the images that cause it (each retried alone)
            for i, e in denoise_step_isolated(self._pipe.unet, [job for _, job in group],
                                              self._pipe.stepper):
                self._fail(group[i][0].req, e)
        self._stage("diffuse", t0)
        if self.observer is not None:
            self._observe("unet", [(c.req.handle.request_id, c.index, job.index)
                                   for c, job in active if not c.done])
        for c, job in active:
            if c.req.kind == "interleaved" and not c.done:  # live progress (serving/progress.py)
                c.req.handle.emit(progress_event(c.index, job.index, len(job.timesteps), job.latents))
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
                              pause_ids=(self._pipe.special.dream_start,), tag=c,
                              stop_strings=r.request.stop)
