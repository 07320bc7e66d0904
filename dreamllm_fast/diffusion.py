"""The image head's sampling loop: DDPM with classifier-free guidance, then VAE decode.

Follows the original (`StableDiffusionHead.pipeline`) and diffusers' StableDiffusionPipeline:
initial latents are drawn from `generator` first, then each DDPM step draws its variance noise
through the scheduler with the same generator; the U-Net sees [uncond; cond] in that batch order and
eps = eps_u + s * (eps_c - eps_u). Guidance is off when s <= 1, as in diffusers.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .errors import InvalidInputError

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(scheduler_config: dict):
    from diffusers import DDPMScheduler

    # from_config drops the PNDM-only keys of SD-2.1's scheduler config, as from_pretrained does.
    return DDPMScheduler.from_config(scheduler_config)


def check_diffusion_args(num_inference_steps, guidance_scale, num_train_timesteps: int) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
            or not 1 <= num_inference_steps <= num_train_timesteps:
        raise InvalidInputError(
            f"num_inference_steps must be an integer in [1, {num_train_timesteps}], got "
            f"{num_inference_steps!r}"
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


@torch.no_grad()
def denoise(unet: UNetFn, scheduler, cond: torch.Tensor, uncond: Optional[torch.Tensor],
            guidance_scale: float, num_inference_steps: int, latents: torch.Tensor,
            generator: Optional[torch.Generator] = None, progress: bool = False) -> torch.Tensor:
    """cond/uncond: [B, Q, C]; latents: [B, c, h, w] (initial noise) -> final latents."""
    from tqdm.auto import tqdm

    do_cfg = guidance_scale > 1.0 and uncond is not None
    context = torch.cat([uncond, cond]) if do_cfg else cond
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="denoise", leave=False):
        model_in = torch.cat([latents] * 2) if do_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        eps = unet(model_in, t, context)
        if do_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, generator=generator, return_dict=False)[0]
    return latents


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
