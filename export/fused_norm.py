"""Swap diffusers' GroupNorm(+SiLU) pairs for the fused kernel (dreamllm_fast.kernels.group_norm).

    n = swap_group_norms(unet)   # in place; returns how many GroupNorms now run fused

The SD-2.1 U-Net and VAE normalize with `nn.GroupNorm` and, in every ResnetBlock2D and at the
output, apply SiLU right after it. Three swaps, all on the diffusers modules themselves:

- `ResnetBlock2D` -> `FusedResnetBlock2D`: the same submodules and the same forward, with norm1 +
  SiLU and norm2 + SiLU as one fused call each (the block's SiLU still acts on the time embedding);
  only the configuration SD uses is taken (time_embedding_norm "default", SiLU, no up/down
  sampling inside the block); other blocks are left alone.
- `conv_norm_out` + `conv_act` (U-Net and VAE decoder): the norm fused with SiLU, the act an Identity.
- every other affine `nn.GroupNorm` (the attention blocks' input norms): `FusedGroupNorm(silu=False)`.

On CUDA tensors the kernel runs; elsewhere the dispatcher runs torch's own GroupNorm + SiLU
(kernels/reference.py), so a swapped module on the CPU computes exactly what the original does.
"""
from __future__ import annotations

import torch
from torch import nn


class FusedGroupNorm(nn.Module):
    """An `nn.GroupNorm`'s parameters, run by the fused kernel, optionally followed by SiLU."""

    def __init__(self, norm: nn.GroupNorm, silu: bool):
        super().__init__()
        assert norm.affine, "only affine GroupNorms are swapped"
        self.num_groups, self.eps, self.silu = norm.num_groups, norm.eps, silu
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dreamllm_fast import kernels as K

        return K.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu=self.silu)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.weight.shape[0]}, eps={self.eps}, silu={self.silu}"


class FusedResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D forward (SD configuration) with its two norm + SiLU pairs fused."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1 = FusedGroupNorm(block.norm1, silu=True)
        self.norm2 = FusedGroupNorm(block.norm2, silu=True)
        self.conv1, self.conv2 = block.conv1, block.conv2
        self.time_emb_proj, self.nonlinearity = block.time_emb_proj, block.nonlinearity
        self.skip_time_act = block.skip_time_act
        self.dropout, self.conv_shortcut = block.dropout, block.conv_shortcut
        self.output_scale_factor = block.output_scale_factor

    def forward(self, input_tensor: torch.Tensor, temb=None, *args, **kwargs) -> torch.Tensor:
        h = self.conv1(self.norm1(input_tensor))
        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            h = h + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + h) / self.output_scale_factor


def _fusable_resnet(m: nn.Module) -> bool:
    from diffusers.models.resnet import ResnetBlock2D

    return (type(m) is ResnetBlock2D and m.time_embedding_norm == "default"
            and m.upsample is None and m.downsample is None and isinstance(m.nonlinearity, nn.SiLU)
            and isinstance(m.norm1, nn.GroupNorm) and isinstance(m.norm2, nn.GroupNorm)
            and m.norm1.affine and m.norm2.affine)


def swap_group_norms(module: nn.Module) -> int:
    """Replace the GroupNorm(+SiLU) pairs of a diffusers U-Net / VAE in place (see the module
    docstring); returns the number of GroupNorms that now run through the fused kernel."""
    count = 0
    norm_out, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
    if isinstance(norm_out, nn.GroupNorm) and norm_out.affine and isinstance(act, nn.SiLU):
        module.conv_norm_out, module.conv_act = FusedGroupNorm(norm_out, silu=True), nn.Identity()
        count += 1
    for name, child in list(module.named_children()):
        if _fusable_resnet(child):
            setattr(module, name, FusedResnetBlock2D(child))
            count += 2
        elif type(child) is nn.GroupNorm and child.affine:
            setattr(module, name, FusedGroupNorm(child, silu=False))
            count += 1
        elif not isinstance(child, (FusedGroupNorm, FusedResnetBlock2D)):
            count += swap_group_norms(child)
    return count


def count_group_norms(module: nn.Module) -> int:
    """`nn.GroupNorm` modules left in a module tree (0 after a full swap of SD's U-Net / VAE)."""
    return sum(type(m) is nn.GroupNorm for m in module.modules())
