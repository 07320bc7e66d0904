"""Torch modules built from checkpoint states directly on their device (meta init, one copy per
tensor): the CLIP tower, the SD-2.1 U-Net and VAE. Reading the states is dreamllm_fast/checkpoint.py."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import HEAD_FILE, _meta_shapes, check_shapes, load_config, read_weight_file
from .config import DreamLLMConfig
from .errors import CheckpointError


def no_meta_left(module, what: str) -> None:
    """Raise if a module built on the meta device still has a tensor that was never loaded."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"{what}: tensor {name} was not loaded (still on the meta device)")


def load_on_device(module: "torch.nn.Module", state: dict, device, dtype, what: str):
    """Assign `state` (cast to device/dtype, floating tensors only) into a module built on meta.

    No random init, no CPU copy of the module, no `module.to()`: real loads copy each tensor to the
    device once, and fake-CUDA runs (tests/gpu_paths) work, where `module.to("cuda")` of a module's
    fake parameters cannot swap them. Raises if a tensor of the module stays on meta.
    """
    def cast(t):
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    module.load_state_dict({k: cast(v) for k, v in state.items()}, strict=True, assign=True)
    no_meta_left(module, what)
    return module.eval()


def load_clip_on_device(clip: "torch.nn.Module", state: dict, device, dtype):
    """`load_on_device` for a CLIPVisionModel built on meta (whole or truncated): takes the state's
    tensors the module has, and rebuilds `position_ids`, a non-persistent buffer the checkpoint does
    not carry."""
    keys = set(clip.state_dict())
    missing = keys - set(state)
    if missing:
        raise CheckpointError(f"CLIP weights missing: {sorted(missing)[:3]}")
    vm = getattr(clip, "vision_model", clip)  # transformers 4.x nests it; 5.x flattens it
    emb = vm.embeddings
    if getattr(emb, "position_ids", None) is not None:
        emb.register_buffer("position_ids", torch.arange(emb.position_ids.shape[-1], device=device)[None],
                            persistent=False)
    return load_on_device(clip, {k: v for k, v in state.items() if k in keys}, device, dtype,
                          "CLIP vision tower")


def build_diffusion_modules(config: DreamLLMConfig, unet_state: dict, vae_state: dict,
                            device="cpu", dtype=torch.float32):
    """The diffusers U-Net and VAE with these weights, built on meta and assigned on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config.diffusion.unet)
        vae = AutoencoderKL.from_config(config.diffusion.vae)
    return (load_on_device(unet, unet_state, device, dtype, "U-Net"),
            load_on_device(vae, vae_state, device, dtype, "VAE"))


def load_unet_vae(ckpt_dir: "str | Path", dtype=torch.float32, device="cpu"):
    """The checkpoint's diffusers U-Net and VAE (for export without the LLM)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    d = Path(ckpt_dir)
    cfg = load_config(d)
    head, head_path = read_weight_file(d, HEAD_FILE)
    exp = {"unet." + k: s for k, s in
           _meta_shapes(lambda: UNet2DConditionModel.from_config(cfg.diffusion.unet)).items()}
    exp.update({"vae." + k: s for k, s in
                _meta_shapes(lambda: AutoencoderKL.from_config(cfg.diffusion.vae)).items()})
    exp["projector.projector.weight"] = (cfg.diffusion.cross_attention_dim, cfg.llm.hidden_size)
    check_shapes(head_path, head, exp)
    return build_diffusion_modules(
        cfg, {k[5:]: v for k, v in head.items() if k.startswith("unet.")},
        {k[4:]: v for k, v in head.items() if k.startswith("vae.")}, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------
