"""Per-component export contract: names, dynamic axes, samples, profiles, shapes.

Every exportable piece of the diffusion head (and, optionally, the CLIP vision tower) is described
by one `ComponentSpec` here, and ONNX export, TensorRT build and the runtime backends read only
this. Shapes, in the real model's units (SD-2.1-base, latents = resolution / 8):

    unet  : sample [2B, 4, h, w] (fp), timestep [2B] (fp32), encoder_hidden_states [2B, Q, C] (fp)
            -> eps [2B, 4, h, w]
    vae   : latent [B, 4, h, w] (fp, already divided by the scaling factor 0.18215)
            -> image [B, 3, 8h, 8w] in [-1, 1]
    vision: pixel_values [B, 3, 224, 224] -> image_features [B, 256, 1024]
            (CLIP hidden_states[-2] with the CLS token dropped, as in the original)

`timestep` is a 1-D float32 tensor with one entry per row ([2B]), never a 0-d scalar: a [2B]
input keeps the graph free of the scalar->batch `expand` special case, lets rows sit at different
steps (two requests batched together), and stays fp32 in an fp16 graph so the sinusoidal
embedding is computed at full precision, as diffusers does. The backends broadcast a Python
number or a 0-d tensor to [2B].

Optimization profiles cover the guidance batch (2 x images) at 512 and 768 pixels for the real
model (latents 64..96); for the tiny preset the same ratios apply (64 and 96 pixels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

Shape = tuple[int, ...]
# input name -> (min, opt, max) shapes: one TensorRT optimization profile.
Profile = dict[str, tuple[Shape, Shape, Shape]]


class UNetExportModule(nn.Module):
    """`eps = unet(sample, timestep, encoder_hidden_states)` with positional args and one tensor out."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        # sample: [2B, 4, h, w]  timestep: [2B] fp32  encoder_hidden_states: [2B, Q, C]
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         return_dict=False)[0]


class VAEDecodeModule(nn.Module):
    """`forward = decode`: latent (already / scaling_factor) -> image in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        # latent: [B, 4, h, w] -> image: [B, 3, 8h, 8w]
        return self.vae.decode(latent, return_dict=False)[0]


class VisionPenultimateModule(nn.Module):
    """CLIPVisionModel up to `select_layer` (default the penultimate), CLS token dropped.

    The last encoder layer and post_layernorm are traced but unused, so the exporter's dead-code
    pass drops them from the graph.
    """

    def __init__(self, clip_vision: nn.Module, select_layer: int = -2):
        super().__init__()
        self.clip_vision = clip_vision
        self.select_layer = select_layer

    def forward(self, pixel_values):
        # pixel_values: [B, 3, 224, 224] -> [B, 256, 1024]
        out = self.clip_vision(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]


@dataclass(frozen=True)
class ComponentSpec:
    """What an exporter, an engine builder and a runtime need to know about one component."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    # ONNX dynamic_axes: tensor name -> {axis: symbolic name}
    dynamic_axes: dict
    wrap: Callable[[nn.Module], nn.Module]
    # (batch, resolution in pixels) -> {input name: shape}; batch counts rows of *this* component
    _input_shapes: Callable[[int, int], dict]
    # {input name: shape} -> {output name: shape} (works for non-square inputs)
    output_shapes: Callable[[dict], dict]
    # inputs that stay fp32 whatever the precision
    fp32_inputs: tuple[str, ...] = ()
    # the component's batch per image (2 for the U-Net under classifier-free guidance)
    rows_per_image: int = 1
    # resolution fixed by the model (vision tower): profiles ignore the requested resolutions
    fixed_resolution: Optional[int] = None

    def input_shapes(self, batch: int, resolution: int) -> dict[str, Shape]:
        return self._input_shapes(batch, self.fixed_resolution or resolution)

    def shape_dict(self, batch: int, resolution: int) -> dict[str, Shape]:
        """Every input and output shape at (batch, resolution): what `Engine.allocate_buffers` takes."""
        ins = self.input_shapes(batch, resolution)
        return {**ins, **self.output_shapes(ins)}

    def input_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if name in self.fp32_inputs else dtype

    def sample_inputs(self, batch: int, resolution: int, *, dtype=torch.float32, device="cpu",
                      generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, ...]:
        """Random inputs in input_names order (timesteps are integers in [0, 1000))."""
        out = []
        for name, shape in self.input_shapes(batch, resolution).items():
            dt = self.input_dtype(name, dtype)
            if name == "timestep":
                t = torch.randint(0, 1000, shape, generator=generator).to(dt)
            else:
                t = torch.randn(shape, generator=generator).to(dt)
            out.append(t.to(device))
        return tuple(out)

    def profile(self, images: tuple[int, int, int] = (1, 1, 2),
                resolutions: tuple[int, int, int] = (512, 512, 768)) -> Profile:
        """One optimization profile: (min, opt, max) images and pixel resolutions.

        For the U-Net `images` is multiplied by 2 (the [uncond; cond] guidance batch).
        """
        mins, opts, maxs = (self.input_shapes(n * self.rows_per_image, r)
                            for n, r in zip(images, resolutions))
        return {k: (mins[k], opts[k], maxs[k]) for k in self.input_names}


def unet_spec(*, latent_channels: int = 4, out_channels: Optional[int] = None,
              cross_attention_dim: int = 1024, num_queries: int = 64,
              vae_scale_factor: int = 8) -> ComponentSpec:
    """SD U-Net contract. The query axis Q is dynamic in ONNX; profiles pin it to num_queries."""
    c_lat, f, q, c = latent_channels, vae_scale_factor, num_queries, cross_attention_dim
    out_c = out_channels or c_lat

    def ins(b, r):
        return {"sample": (b, c_lat, r // f, r // f), "timestep": (b,),
                "encoder_hidden_states": (b, q, c)}

    return ComponentSpec(
        name="unet",
        input_names=("sample", "timestep", "encoder_hidden_states"),
        output_names=("eps",),
        dynamic_axes={"sample": {0: "B", 2: "h", 3: "w"}, "timestep": {0: "B"},
                      "encoder_hidden_states": {0: "B", 1: "Q"}, "eps": {0: "B", 2: "h", 3: "w"}},
        wrap=UNetExportModule,
        _input_shapes=ins,
        output_shapes=lambda s: {"eps": (s["sample"][0], out_c, *s["sample"][2:])},
        fp32_inputs=("timestep",),
        rows_per_image=2,
    )


def vae_decoder_spec(*, latent_channels: int = 4, out_channels: int = 3,
                     vae_scale_factor: int = 8) -> ComponentSpec:
    """VAE decoder contract: latent (already / scaling_factor) -> image in [-1, 1]."""
    c_lat, f = latent_channels, vae_scale_factor

    def outs(s):
        b, _, h, w = s["latent"]
        return {"image": (b, out_channels, h * f, w * f)}

    return ComponentSpec(
        name="vae",
        input_names=("latent",),
        output_names=("image",),
        dynamic_axes={"latent": {0: "B", 2: "h", 3: "w"}, "image": {0: "B", 2: "H", 3: "W"}},
        wrap=VAEDecodeModule,
        _input_shapes=lambda b, r: {"latent": (b, c_lat, r // f, r // f)},
        output_shapes=outs,
    )


def vision_spec(*, image_size: int = 224, num_patches: int = 256, hidden_size: int = 1024,
                select_layer: int = -2) -> ComponentSpec:
    """CLIP vision tower up to `select_layer`, CLS dropped; the resolution is fixed (224)."""
    return ComponentSpec(
        name="vision",
        input_names=("pixel_values",),
        output_names=("image_features",),
        dynamic_axes={"pixel_values": {0: "B"}, "image_features": {0: "B"}},
        wrap=lambda m: VisionPenultimateModule(m, select_layer),
        _input_shapes=lambda b, r: {"pixel_values": (b, 3, image_size, image_size)},
        output_shapes=lambda s: {"image_features": (s["pixel_values"][0], num_patches, hidden_size)},
        fixed_resolution=image_size,
    )


COMPONENTS = ("unet", "vae", "vision")


def get_spec(component: str, cfg) -> ComponentSpec:
    """The contract of `component` for a DreamLLMConfig."""
    d = cfg.diffusion
    if component == "unet":
        return unet_spec(latent_channels=d.latent_channels,
                         out_channels=int(d.unet.get("out_channels", d.latent_channels)),
                         cross_attention_dim=d.cross_attention_dim,
                         num_queries=cfg.num_dream_queries, vae_scale_factor=d.vae_scale_factor)
    if component == "vae":
        return vae_decoder_spec(latent_channels=int(d.vae["latent_channels"]),
                                out_channels=int(d.vae.get("out_channels", 3)),
                                vae_scale_factor=d.vae_scale_factor)
    if component == "vision":
        v = cfg.vision
        return vision_spec(image_size=v.image_size, num_patches=v.num_patches,
                           hidden_size=v.hidden_size, select_layer=v.select_layer)
    raise ValueError(f"unknown component {component!r}; choose one of {list(COMPONENTS)}")


def unet_spec_from_module(unet: nn.Module, num_queries: int = 64,
                          vae_scale_factor: int = 8) -> ComponentSpec:
    """Contract read off a diffusers UNet2DConditionModel's config (the backends' default)."""
    c = unet.config
    return unet_spec(latent_channels=int(c.in_channels), out_channels=int(c.out_channels),
                     cross_attention_dim=int(c.cross_attention_dim), num_queries=num_queries,
                     vae_scale_factor=vae_scale_factor)


def vae_spec_from_module(vae: nn.Module) -> ComponentSpec:
    c = vae.config
    return vae_decoder_spec(latent_channels=int(c.latent_channels),
                            out_channels=int(c.out_channels),
                            vae_scale_factor=2 ** (len(c.block_out_channels) - 1))


def default_resolutions(default_resolution: int = 512) -> tuple[int, int, int]:
    """(min, opt, max) pixels of the default profile: 512/512/768 for SD-2.1-base, same ratio tiny."""
    r = default_resolution
    return (r, r, r * 3 // 2)
