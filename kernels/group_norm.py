"""GroupNorm, optionally fused with the SiLU that follows it in diffusers' U-Net and VAE blocks.

x: [N, C, *spatial] in NCHW (contiguous) or channels-last layout. A group (one sample, C/G
channels, every spatial position) is far too large for registers (40960 elements for the SD-2.1
U-Net's first blocks at 512x512, up to 1M in the VAE's last), so two passes:

1. `_group_norm_stats_kernel`, grid (N*G, S): each program reduces one slice of a group's spatial
   positions to (mean, M2) with a per-tile two-pass and Chan's merge across tiles (no
   sum-of-squares cancellation), written to fp32 scratch [N*G, S].
2. `_group_norm_apply_kernel`, grid (N*G, S): each program merges its group's S partials (Chan
   again), then writes y = x * (w * rstd) + (b - mean * w * rstd), then SiLU, for its slice.

S splits a group so both grids hold a few waves of programs even at the U-Net's N*G = 64 groups
(a one-program-per-group grid would leave half of an H100's 132 SMs idle). A group is seen as a 2-D
tile [positions, channels] with its own strides, so both layouts take the same kernel; the fused
SiLU saves the separate activation's full read and write of x. The output is rounded once (torch
rounds after the norm and again after SiLU).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne
from ._utils import cdiv, is_interpret, is_tracing, next_pow2, num_sms, plan_cache, register_triton_op, wrap


@triton.jit
def _group_norm_stats_kernel(
    # pointers
    x_ptr, mean_ptr, m2_ptr,
    # sizes
    HW, CG, G, ROWS, S,
    # strides
    stride_xn, stride_xc, stride_xhw,
    # meta
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # n * G + g
    split = tl.program_id(1).to(tl.int64)
    n, g = pid // G, pid % G
    base = x_ptr + n * stride_xn + g * CG * stride_xc
    hw_lo = split * ROWS
    hw_hi = tl.minimum(hw_lo + ROWS, HW)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < CG
    count = tl.zeros((), tl.float32)
    mean = tl.zeros((), tl.float32)
    m2 = tl.zeros((), tl.float32)
    for start in range(hw_lo, hw_hi, BLOCK_HW):
        rows = start + tl.arange(0, BLOCK_HW)
        mask = (rows < hw_hi)[:, None] & cmask[None, :]
        x = tl.load(base + rows[:, None] * stride_xhw + cols[None, :] * stride_xc, mask=mask,
                    other=0.0).to(tl.float32)
        k = (tl.minimum(hw_hi - start, BLOCK_HW) * CG).to(tl.float32)
        t_mean = tl.sum(tl.sum(x, axis=1), axis=0) / k
        d = tl.where(mask, x - t_mean, 0.0)
        t_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        # Chan et al.: merge (count, mean, m2) with the tile's (k, t_mean, t_m2)
        total = count + k
        delta = t_mean - mean
        mean += delta * (k / total)
        m2 += t_m2 + delta * delta * (count * k / total)
        count = total
    tl.store(mean_ptr + pid * S + split, mean)
    tl.store(m2_ptr + pid * S + split, m2)


@triton.jit
def _group_norm_apply_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, mean_ptr, m2_ptr, y_ptr,
    # sizes
    HW, CG, G, ROWS, S, eps,
    # strides
    stride_xn, stride_xc, stride_xhw, stride_yn, stride_yc, stride_yhw,
    # meta
    HAS_SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # Inductor types Python floats fp64 (torch 2.11-2.14)
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n, g = pid // G, pid % G
    # merge the group's S partials: counts follow from the split geometry
    s = tl.arange(0, BLOCK_S)
    smask = s < S
    lo = s.to(tl.int64) * ROWS
    cnt = tl.where(smask, (tl.minimum(lo + ROWS, HW) - lo) * CG, 0).to(tl.float32)
    p_mean = tl.load(mean_ptr + pid * S + s, mask=smask, other=0.0)
    p_m2 = tl.load(m2_ptr + pid * S + s, mask=smask, other=0.0)
    total = (HW * CG).to(tl.float32)
    mean = tl.sum(cnt * p_mean, axis=0) / total
    dev = p_mean - mean
    var = tl.sum(p_m2 + cnt * dev * dev, axis=0) / total  # biased, as torch's GroupNorm
    rstd = 1.0 / tl.sqrt(var + eps)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < CG
    w = tl.load(w_ptr + g * CG + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + g * CG + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = w * rstd
    shift = b - mean * scale
    xb = x_ptr + n * stride_xn + g * CG * stride_xc
    yb = y_ptr + n * stride_yn + g * CG * stride_yc
    hw_lo = split * ROWS
    hw_hi = tl.minimum(hw_lo + ROWS, HW)
    for start in range(hw_lo, hw_hi, BLOCK_HW):
        rows = start + tl.arange(0, BLOCK_HW)
        mask = (rows < hw_hi)[:, None] & cmask[None, :]
        x = tl.load(xb + rows[:, None] * stride_xhw + cols[None, :] * stride_xc, mask=mask,
                    other=0.0).to(tl.float32)
        y = x * scale[None, :] + shift[None, :]
        if HAS_SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(yb + rows[:, None] * stride_yhw + cols[None, :] * stride_yc,
                 cast_rne(y, y_ptr.dtype.element_ty, IS_INTERPRET), mask=mask)


def _spatial_stride(t: torch.Tensor) -> Optional[int]:
    """The one stride that walks t's spatial dims [2:] in order (None if they do not flatten)."""
    shape, stride = t.shape[2:], t.stride()[2:]
    for i in range(len(shape) - 1):
        if shape[i] > 1 and stride[i] != stride[i + 1] * shape[i + 1]:
            return None
    return stride[-1] if shape else 1


def _plan(N: int, C: int, HW: int, G: int, silu: bool, sms: int) -> dict:
    """Tile and split sizes for a shape (shape-only, cached)."""
    cg = C // G
    block_c = next_pow2(cg)
    tile = 256 if is_interpret() else 4096  # elements per tile: 16 fp32 registers a thread at 8 warps
    block_hw = max(1, min(next_pow2(HW), tile // block_c))
    tiles = cdiv(HW, block_hw)
    # a few waves of programs over the whole grid, at most 64 splits (the apply kernel merges them)
    splits = max(1, min(tiles, cdiv(4 * sms, N * G), 64))
    rows = cdiv(tiles, splits) * block_hw
    splits = cdiv(HW, rows)
    warps = 8 if block_hw * block_c >= 4096 else 4
    return dict(rows=rows, splits=splits,
                stats=dict(BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=warps),
                apply=dict(HAS_SILU=silu, BLOCK_HW=block_hw, BLOCK_C=block_c,
                           BLOCK_S=next_pow2(splits), IS_INTERPRET=is_interpret(), num_warps=warps))


_PLANS = plan_cache()  # (N, C, HW, G, silu, sms) -> plan


def _launch(stats_kernel, apply_kernel, x, weight, bias, G, eps, out, plan):
    N, C = x.shape[0], x.shape[1]
    HW = x.numel() // (N * C) if N * C else 0
    if N * C * HW == 0:
        return
    S, rows = plan["splits"], plan["rows"]
    mean = torch.empty(N * G, S, device=x.device, dtype=torch.float32)
    m2 = torch.empty(N * G, S, device=x.device, dtype=torch.float32)
    sx = (x.stride(0), x.stride(1), _spatial_stride(x))
    sy = (out.stride(0), out.stride(1), _spatial_stride(out))
    grid = (N * G, S)
    stats_kernel[grid](x, mean, m2, HW, C // G, G, rows, S, *sx, **plan["stats"])
    apply_kernel[grid](x, weight, bias, mean, m2, out, HW, C // G, G, rows, S, eps, *sx, *sy,
                       **plan["apply"])


@register_triton_op("group_norm", mutates_args=("out",))
def _group_norm_traced(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                       eps: float, silu: bool, out: torch.Tensor) -> None:
    N, C = x.shape[0], x.shape[1]
    plan = _plan(N, C, x.numel() // max(1, N * C), num_groups, silu, num_sms(x.device))
    _launch(wrap(_group_norm_stats_kernel), wrap(_group_norm_apply_kernel), x, weight, bias,
            num_groups, eps, out, plan)


def group_norm(x, weight, bias, num_groups: int, eps: float, silu: bool = False, out=None):
    """GroupNorm over [N, C, *spatial] with per-channel affine weight and bias, then SiLU if `silu`.

    x: [N, C, *spatial] (contiguous or channels-last: the spatial dims must flatten to one
    stride); weight, bias: [C]; C divisible by num_groups; out: like x (any layout whose spatial
    dims flatten) or None (a tensor in x's memory format). Statistics in fp32, output in x's dtype.
    """
    assert x.dim() >= 3, f"x must be [N, C, *spatial], got {tuple(x.shape)}"
    N, C = x.shape[0], x.shape[1]
    assert isinstance(num_groups, int) and num_groups > 0 and C % num_groups == 0, \
        f"C = {C} must be divisible by num_groups = {num_groups}"
    assert weight.shape == (C,) and bias.shape == (C,), \
        f"weight and bias must be [{C}], got {tuple(weight.shape)} and {tuple(bias.shape)}"
    assert weight.stride()[-1] == 1 and bias.stride()[-1] == 1, "weight and bias must be contiguous"
    assert x.get_device() == weight.get_device() == bias.get_device(), \
        "x, weight and bias must be on one device"
    assert _spatial_stride(x) is not None, \
        "x's spatial dims must flatten to one stride (use .contiguous() or channels_last)"
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype, "out must match x's shape and dtype"
    assert _spatial_stride(out) is not None, "out's spatial dims must flatten to one stride"
    eps = float(eps)
    if is_tracing(x):
        _group_norm_traced.op(x, weight, bias, num_groups, eps, bool(silu), out)
        return out
    HW = math.prod(x.shape[2:])
    key = (N, C, HW, num_groups, bool(silu), num_sms(x.device))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(*key)
    _launch(_group_norm_stats_kernel, _group_norm_apply_kernel, x, weight, bias, num_groups, eps,
            out, plan)
    return out
