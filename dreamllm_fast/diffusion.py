"""The image head's sampling loop: DDPM (or another sampler) with classifier-free guidance, then VAE decode.

Follows the original (`StableDiffusionHead.pipeline`) and diffusers' StableDiffusionPipeline:
initial latents are drawn from `generator` first, then each DDPM step draws its variance noise
through the scheduler with the same generator; the U-Net sees [uncond; cond] in that batch order and
eps = eps_u + s * (eps_c - eps_u). Guidance is off when s <= 1, as in diffusers.

`DiffusionJob` holds one image's state and `denoise_step` advances several jobs with one U-Net
call (the server batches the images of concurrent requests this way); `denoise` is the one-image
loop over the same two pieces.

Samplers (`SAMPLERS`): "ddpm" is the original's and the default (the model was trained and
evaluated with DDPM, 50 steps); "dpmpp-2m" and "unipc" are diffusers' DPMSolverMultistepScheduler
(DPM-Solver++ 2M) and UniPCMultistepScheduler built from the same SD-2.1 scheduler config, options
for fewer steps. Multistep samplers keep state between steps (the previous model outputs, the step
index); it lives in each job's own scheduler instance, so jobs batched together never share it.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
from typing import Callable, Optional, Sequence

import torch

from .errors import InvalidInputError

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


SAMPLERS = ("ddpm", "dpmpp-2m", "unipc")
DEFAULT_SAMPLER = "ddpm"


def check_sampler(sampler) -> str:
    if sampler not in SAMPLERS:
        raise InvalidInputError(f"sampler must be one of {SAMPLERS} (default {DEFAULT_SAMPLER!r}, "
                                f"the original's), got {sampler!r}")
    return sampler


def make_noise_scheduler(scheduler_config: dict, sampler: str = DEFAULT_SAMPLER):
    """A fresh diffusers scheduler of `sampler` configured from the model's scheduler config.

    from_config drops the keys a class does not know (SD-2.1's config is a PNDM one), as
    from_pretrained does; the betas, timestep spacing and prediction type carry over.
    """
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    cls = {"ddpm": DDPMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler,
           "unipc": UniPCMultistepScheduler}[check_sampler(sampler)]
    # DPMSolverMultistepScheduler's defaults are DPM-Solver++ of order 2 ("2M"); stated, not implied.
    extra = dict(algorithm_type="dpmsolver++", solver_order=2) if sampler == "dpmpp-2m" else {}
    return cls.from_config(scheduler_config, **extra)


def sampler_of(scheduler) -> str:
    """The `SAMPLERS` name of a scheduler built by `make_noise_scheduler`."""
    name = type(scheduler).__name__
    return {"DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp-2m",
            "UniPCMultistepScheduler": "unipc"}.get(name, name)


def _takes_generator(scheduler) -> bool:
    """diffusers' pipelines pass `generator` to step() only when it takes one (UniPC does not)."""
    return "generator" in inspect.signature(scheduler.step).parameters


@functools.lru_cache(maxsize=8)
def _max_steps(config_json: str) -> int:
    sched = make_noise_scheduler(json.loads(config_json))
    T = int(sched.config.num_train_timesteps)
    for n in range(1, T + 1):
        sched.set_timesteps(n)
        ts = sched.timesteps
        if int(ts.max()) >= T or int(ts.min()) < 0:
            return n - 1
    return T


def max_inference_steps(scheduler_config: dict) -> int:
    """The most DDPM steps this scheduler config can take: the largest N such that every step
    count in [1, N] gives timesteps inside [0, num_train_timesteps). With SD-2.1's "leading"
    spacing and steps_offset 1, N = 999: 1000 steps would ask for timestep 1000 and fail with an
    IndexError inside the scheduler (found by a hostile-client audit). Computed once per config
    (1000 `set_timesteps` calls: ~12 ms on a CPU)."""
    return _max_steps(json.dumps(scheduler_config, sort_keys=True, default=str))


def check_diffusion_args(num_inference_steps, guidance_scale, max_steps: int) -> None:
    """max_steps: `max_inference_steps(scheduler_config)`."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
            or not 1 <= num_inference_steps <= max_steps:
        raise InvalidInputError(
            f"num_inference_steps must be an integer in [1, {max_steps}] for this model's "
            f"scheduler, got {num_inference_steps!r}"
        )
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) \
            or guidance_scale < 0:
        raise InvalidInputError(
            f"guidance_scale must be a finite number >= 0 (<= 1 disables guidance), got "
            f"{guidance_scale!r}"
        )


def prepare_latents(shape, dtype, device, generator, latents: Optional[torch.Tensor]):
    from diffusers.utils.torch_utils import randn_tensor

    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape):
        got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise InvalidInputError(f"latents must have shape {list(shape)}, got {got}")
    return latents.to(device=device, dtype=dtype)


class DiffusionJob:
    """One image's sampler + CFG state, advanced one step at a time, alone or beside other jobs.

    cond/uncond: [B, Q, C]; latents: [B, c, h, w] (initial noise); `scheduler`: this job's own
    scheduler instance from `make_noise_scheduler` (its timesteps follow its own step count; a multistep
    sampler's history of model outputs lives in it, so it must not be shared between jobs). Every job keeps its own guidance
    scale and generator, so a server can batch the U-Net calls of images at different steps,
    with different settings and seeds (`denoise_step`), and each image equals its solo run.
    """

    def __init__(self, scheduler, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                 guidance_scale: float, num_inference_steps: int, latents: torch.Tensor,
                 generator: Optional[torch.Generator] = None):
        self.scheduler = scheduler
        self.sampler = sampler_of(scheduler)
        self._step_kwargs = dict(generator=generator) if _takes_generator(scheduler) else {}
        self.guidance_scale = guidance_scale
        self.generator = generator
        self.do_cfg = guidance_scale > 1.0 and uncond is not None
        self.context = torch.cat([uncond, cond]) if self.do_cfg else cond  # [uncond; cond] order
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        self.timesteps = scheduler.timesteps
        self.host_timesteps = [int(t) for t in self.timesteps.tolist()]  # compared without a sync
        self.latents = latents * scheduler.init_noise_sigma
        self.index = 0  # steps taken

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def rows(self) -> int:
        """U-Net batch rows this job adds to a step (2B with guidance, B without)."""
        return self.context.shape[0]

    def model_input(self) -> torch.Tensor:
        x = torch.cat([self.latents] * 2) if self.do_cfg else self.latents
        return self.scheduler.scale_model_input(x, self.timesteps[self.index])

    def apply(self, eps: torch.Tensor) -> None:
        """This job's rows of the U-Net output -> guidance -> one sampler step (its own noise)."""
        if self.do_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + self.guidance_scale * (eps_c - eps_u)
        # the host copy of t: DDPMScheduler.step branches on t and indexes its CPU alphas with
        # it, which with a device tensor costs a host sync per branch (same values either way;
        # the multistep schedulers look t up in their timesteps once, on their first step)
        t = self.host_timesteps[self.index]
        self.latents = self.scheduler.step(eps, t, self.latents, **self._step_kwargs,
                                           return_dict=False)[0]
        self.index += 1


@torch.no_grad()
def denoise_step(unet: UNetFn, jobs: Sequence[DiffusionJob], stepper=None) -> None:
    """One U-Net call for every job (same latent shape and dtype), then each job's sampler step.

    stepper: a whole-step runner (export/graphs_backend.py `GraphDenoiser`: `reason(jobs)` None
    when it takes these jobs, `step(jobs)`, `release()`), or None. Jobs it does not take run the
    path below, after it has handed back any state it held for them.

    Rows are laid out job after job, each as [uncond; cond] (or cond alone), with each job's own
    timestep per row; when all jobs sit at the same timestep it is passed as one scalar, exactly
    what the one-image loop passes (a lone job's call is the same call as `denoise`'s).
    """
    if not jobs:
        return
    if stepper is not None:
        if stepper.reason(jobs) is None:
            stepper.step(jobs)
            return
        stepper.release()
    ins = [j.model_input() for j in jobs]
    if len({j.host_timesteps[j.index] for j in jobs}) == 1:
        t = jobs[0].timesteps[jobs[0].index]
    else:
        t = torch.cat([j.timesteps[j.index].reshape(1).expand(j.rows) for j in jobs])
    if len(jobs) == 1:
        sample, context = ins[0], jobs[0].context
    else:
        sample, context = torch.cat(ins), torch.cat([j.context for j in jobs])
    eps = unet(sample, t, context)
    if eps.shape[0] != sample.shape[0]:
        raise RuntimeError(f"the U-Net returned {eps.shape[0]} rows for a batch of {sample.shape[0]}")
    for j, e in zip(jobs, eps.split([j.rows for j in jobs])):
        j.apply(e)


def denoise_step_isolated(unet: UNetFn, jobs: Sequence[DiffusionJob],
                          stepper=None) -> list[tuple[int, Exception]]:
    """`denoise_step` over `jobs` (and `stepper`), where a Python-level error is pinned on the jobs
    that cause it.

    Returns (index in `jobs`, exception) of the jobs that failed; every other job took its step.
    When the shared call raises, each job that has not stepped yet is retried alone (the same
    math as its share of the batched call: a lone job's call is the one-image loop's), and only
    those whose own call raises fail (a failure that no job shows alone fails none: each then took
    its step alone). A device error (`devices.device_failed`) or a lone job: every job that did
    not step fails with the error.
    """
    from .devices import device_failed

    before = [j.index for j in jobs]
    try:
        denoise_step(unet, jobs, stepper)
        return []
    except Exception as e:  # noqa: BLE001 - sorted out below
        error = e
    pending = [i for i, j in enumerate(jobs) if j.index == before[i]]
    if device_failed(error) or len(jobs) < 2:
        return [(i, error) for i in pending]
    failed = []
    for i in pending:
        try:
            denoise_step(unet, [jobs[i]], stepper)
        except Exception as e:  # noqa: BLE001 - this job's own step fails
            if device_failed(e):
                return [(k, e) for k in pending if jobs[k].index == before[k]]
            failed.append((i, e))
    return failed


@torch.no_grad()
def denoise(unet: UNetFn, scheduler, cond: torch.Tensor, uncond: Optional[torch.Tensor],
            guidance_scale: float, num_inference_steps: int, latents: torch.Tensor,
            generator: Optional[torch.Generator] = None, progress: bool = False,
            stepper=None) -> torch.Tensor:
    """cond/uncond: [B, Q, C]; latents: [B, c, h, w] (initial noise) -> final latents.
    stepper: see `denoise_step`."""
    from tqdm.auto import tqdm

    job = DiffusionJob(scheduler, cond, uncond, guidance_scale, num_inference_steps, latents, generator)
    for _ in tqdm(range(len(job.timesteps)), disable=not progress, desc="denoise", leave=False):
        denoise_step(unet, [job], stepper)
    return job.latents


@torch.no_grad()
def decode_latents(vae_decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                   scaling_factor: float) -> torch.Tensor:
    """latents [B, c, h, w] -> image [B, 3, H, W] float32 in [0, 1]."""
    image = vae_decode(latents / scaling_factor)
    return (image.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list:
    """[B, 3, H, W] in [0, 1] -> PIL images (diffusers' rounding: round(255 x))."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images.cpu()))


class EagerDiffusionHead:
    """The eager U-Net and VAE calls over `self.unet` / `self.vae` (diffusers modules), shared by
    the reference and engine backends; export backends replace them per component."""

    @torch.no_grad()
    def unet_eps(self, sample, t, cond) -> torch.Tensor:
        return self.unet(sample, t, encoder_hidden_states=cond, return_dict=False)[0]

    @torch.no_grad()
    def vae_decode(self, latents) -> torch.Tensor:
        """latents already divided by the scaling factor -> image in [-1, 1]."""
        return self.vae.decode(latents, return_dict=False)[0]
