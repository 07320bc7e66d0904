"""Random checkpoints built in memory (GPU tests and benchmarks at the real 7B shapes).

`random_checkpoint(config)` returns a `Checkpoint` whose tensors have exactly the shapes and names
`load_checkpoint` produces, drawn on `device` (13 GB at 7B shapes: never written to disk). Timing
depends only on shapes, not on weight values, and both backends accept the object as they would a
loaded checkpoint. The tokenizer of a tiny checkpoint directory (`path`) can stand in for the
real one: its ids are all < 400, valid in any vocabulary this large.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import Checkpoint, llm_expected_shapes
from ..config import DreamLLMConfig


@torch.no_grad()
def random_checkpoint(config: Optional[DreamLLMConfig] = None, device="cpu", dtype=torch.bfloat16,
                      seed: int = 0, std: float = 0.02, path: "str | Path | None" = None) -> Checkpoint:
    """A `Checkpoint` of random weights with `config`'s shapes (default: the released 7B model).

    LLM and projector matrices ~ N(0, std^2) (LLaMA's init scale), norm weights ~ 1 + N(0, 0.1^2);
    CLIP, U-Net and VAE use their libraries' own random init, built directly on `device`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModel

    cfg = config or DreamLLMConfig()
    dev = torch.device(device)
    g = torch.Generator(dev).manual_seed(seed)
    torch.manual_seed(seed)

    def rand(shape, norm=False):
        t = torch.randn(shape, generator=g, device=dev, dtype=torch.float32)
        t = (1.0 + 0.1 * t) if norm else t.mul_(std)
        return t.to(dtype)

    llm = {k: rand(s, norm=k.endswith("norm.weight")) for k, s in llm_expected_shapes(cfg.llm).items()}
    H, C, Hc = cfg.llm.hidden_size, cfg.diffusion.cross_attention_dim, cfg.vision.hidden_size
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # the generic "cast with to()" notice: intended here
    try:
        with torch.device(dev):
            clip = CLIPVisionModel(cfg.vision.to_hf()).to(dtype)
            clip_sd = {k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
            del clip
            unet_sd = UNet2DConditionModel.from_config(cfg.diffusion.unet).to(dtype).state_dict()
            vae_sd = AutoencoderKL.from_config(cfg.diffusion.vae).to(dtype).state_dict()
    finally:
        dlog.set_verbosity(level)
    return Checkpoint(
        path=Path(path) if path is not None else Path("<random>"), config=cfg, llm=llm, clip=clip_sd,
        clip_proj_weight=rand((H, Hc)), clip_proj_bias=rand((H,)),
        dream_queries=rand((cfg.num_dream_queries, H)), cond_proj_weight=rand((C, H)),
        unet=unet_sd, vae=vae_sd,
    )
