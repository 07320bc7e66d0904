"""The models a bench run measures, built the same way in the parent and in isolated children.

- ``build_models``: the LLM-bearing backends: ``engine`` (CUDA graphs on CUDA), ``engine_eager``
  (``EngineConfig(use_cuda_graphs=False)``), ``reference`` (transformers + diffusers).
- ``DiffusionModels``: only the U-Net and the VAE, for runs (and children) that measure nothing
  else: the 7B LLM is never built for them (16 s and 13.5 GB saved on an H100).

Weights: a real checkpoint (``checkpoint``), the tiny checkpoint (preset ``tiny``, written to a
temporary folder), or random weights at a preset's shapes (``devtools.testing.random_checkpoint``;
timing depends on shapes, not values).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..config import DreamLLMConfig, EngineConfig, Precision, SpecialTokens
from ..diffusion import EagerDiffusionHead
from . import BACKENDS


def resolve_preset(preset: Optional[str], checkpoint: Optional[str], device: torch.device) -> str:
    if checkpoint:
        return "checkpoint"
    return preset or ("dreamllm-7b" if device.type == "cuda" else "tiny")


def _tiny_dir() -> Path:
    from ..tiny import make_tiny

    return make_tiny(Path(tempfile.mkdtemp(prefix="dreamllm-bench-")) / "tiny")


def build_checkpoint(preset: Optional[str], checkpoint: Optional[str], device, dtype):
    """(Checkpoint, SpecialTokens) for a checkpoint directory, the tiny preset or random weights."""
    from ..checkpoint import load_checkpoint, load_tokenizer

    if checkpoint:
        ckpt = load_checkpoint(checkpoint)
        return ckpt, SpecialTokens.from_tokenizer(ckpt.tokenizer())
    tiny = _tiny_dir()  # its tokenizer stands in: ids are valid in any vocabulary
    special = SpecialTokens.from_tokenizer(load_tokenizer(tiny))
    if resolve_preset(preset, None, torch.device(device)) == "tiny":
        return load_checkpoint(tiny), special
    from ..devtools.testing import random_checkpoint

    return random_checkpoint(DreamLLMConfig.from_name(preset), device=device, dtype=dtype), special


def build_models(backends, preset, checkpoint, device, dtype, weights=(), errors=None) -> dict:
    """{name: model} for `backends` (a subset of BACKENDS), all on one checkpoint's tensors; plus
    "engine-<fmt>" for each quantized format in `weights` (int8, fp8). A quantized engine that
    cannot be built (fp8 below compute capability 8.9) goes to `errors` as (name, exception)
    instead of failing the others."""
    ckpt, special = build_checkpoint(preset, checkpoint, device, dtype)
    models = {}
    for name in backends:
        if name in ("engine", "engine_eager"):
            from ..engine import EngineModel

            # the bench times bare decode steps (one embedding in, logits out): capture that step too
            ec = EngineConfig(precision=Precision.parse(dtype), use_cuda_graphs=name == "engine",
                              capture_logits_graphs=True)
            models[name] = EngineModel(ckpt, special, device=device, dtype=dtype, engine_config=ec)
        elif name == "reference":
            from ..reference import ReferenceModel

            models[name] = ReferenceModel(ckpt, special, device=device, dtype=dtype)
        else:
            raise ValueError(f"unknown bench backend {name!r}; choose from {BACKENDS}")
    for fmt in dict.fromkeys(weights):
        if fmt == "bf16":  # the plain engine: `backends` decides
            continue
        from ..engine import EngineModel

        try:
            ec = EngineConfig(precision=Precision.parse(dtype), weights=fmt)
            models[f"engine-{fmt}"] = EngineModel(ckpt, special, device=device, dtype=dtype, engine_config=ec)
        except Exception as e:
            if errors is None:
                raise
            errors.append((f"engine-{fmt}", e))
    return models


class DiffusionModels(EagerDiffusionHead):
    """The U-Net and the VAE alone, with the attributes the unet/vae/projection stages read."""

    name = "diffusion"

    def __init__(self, preset, checkpoint, device, dtype):
        self.device, self.dtype = torch.device(device), dtype
        if checkpoint or resolve_preset(preset, None, self.device) == "tiny":
            from ..checkpoint import load_config
            from ..modules import load_unet_vae

            d = Path(checkpoint) if checkpoint else _tiny_dir()
            # Q is read from the dream-query weights by load_checkpoint; the tiny preset's is known
            q = None if checkpoint else DreamLLMConfig.from_name("tiny").num_dream_queries
            self.config = load_config(d, num_dream_queries=q)
            self.unet, self.vae = load_unet_vae(d, dtype=dtype, device=self.device)
            return
        from diffusers import AutoencoderKL, UNet2DConditionModel

        self.config = DreamLLMConfig.from_name(preset)
        d = self.config.diffusion
        torch.manual_seed(0)
        with torch.device(self.device):  # random init on the device: shapes are what is timed
            self.unet = UNet2DConditionModel.from_config(d.unet).to(dtype).eval()
            self.vae = AutoencoderKL.from_config(d.vae).to(dtype).eval()
