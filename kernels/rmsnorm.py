"""RMSNorm (HF LlamaRMSNorm math), optionally fused with the residual add.

One program per row; the whole row lives in registers (H = 4096 for Vicuna-7B), so one read of x
(and residual) and one write of each output: the op is bandwidth-bound and this is its floor.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne
from ._utils import is_interpret, is_tracing, next_pow2, plan_cache, register_triton_op, warps_for_block, wrap


@triton.jit
def _rmsnorm_kernel(
    # pointers
    x_ptr, res_ptr, res_out_ptr, w_ptr, y_ptr,
    # sizes
    N, eps,
    # strides
    stride_x, stride_r, stride_ro, stride_y,
    # meta
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # Inductor types Python floats fp64 (torch 2.11-2.14)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # h = x + residual rounded to the activation dtype, exactly as torch adds in bf16/fp16.
        h = cast_rne(x + r, res_out_ptr.dtype.element_ty, IS_INTERPRET)
        tl.store(res_out_ptr + row * stride_ro + cols, h, mask=mask)
        x = h.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    # HF: normalized value cast to the input dtype first, then times the weight.
    normed = cast_rne(x * rstd, x_ptr.dtype.element_ty, IS_INTERPRET).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, cast_rne(normed * w, y_ptr.dtype.element_ty, IS_INTERPRET), mask=mask)


def _meta(H: int, has_res: bool) -> dict:
    """Constexprs and launch options for a row width (shape-only; asserts fire on every call
    that would use an invalid width, since a failing key is never cached)."""
    block = next_pow2(H)
    assert block <= 65536, f"hidden size {H} too large for a one-pass row kernel"
    return dict(HAS_RESIDUAL=has_res, BLOCK_N=block, IS_INTERPRET=is_interpret(), num_warps=warps_for_block(block))


_PLANS = plan_cache()  # (H, has_residual) -> meta


def _row_stride(t: torch.Tensor, H: int) -> int:
    """Row stride of t seen as [rows, H]; 2-D tensors without a view (1.7 us each here)."""
    return t.stride()[0] if t.dim() == 2 else t.view(-1, H).stride()[0]


def _launch(kernel, x, weight, eps, residual, out, residual_out, meta):
    H = x.shape[-1]
    rows = x.numel() // H if H else 0
    sx = _row_stride(x, H)
    if meta["HAS_RESIDUAL"]:
        sr, sro = _row_stride(residual, H), _row_stride(residual_out, H)
    else:  # unused pointers: x stands in
        residual, residual_out, sr, sro = x, x, sx, sx
    if rows > 0:
        kernel[(rows,)](x, residual, residual_out, weight, out, H, eps, sx, sr, sro, _row_stride(out, H), **meta)


@register_triton_op("rmsnorm", mutates_args=("out", "residual_out"))
def _rmsnorm_traced(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor],
                    out: torch.Tensor, residual_out: Optional[torch.Tensor]) -> None:
    has_res = residual is not None and residual_out is not None
    _launch(wrap(_rmsnorm_kernel), x, weight, eps, residual, out, residual_out, _meta(x.shape[-1], has_res))


def rmsnorm(x, weight, eps, residual=None, out=None, residual_out=None):
    """RMSNorm over the last dim, fp32 statistics, output in x's dtype.

    x: [..., H] (last dim contiguous, flattenable with view(-1, H)); weight: [H]; residual,
    residual_out: like x or None; out: like x (last dim contiguous) or None. Without residual
    returns normed [..., H]. With residual computes h = x + residual (into residual_out, or in
    place into residual) and returns (normed, h).
    """
    shape, dtype = x.shape, x.dtype
    H = shape[-1]
    assert weight.shape == (H,), f"weight must be [{H}], got {tuple(weight.shape)}"
    assert x.stride()[-1] == 1 and weight.stride()[-1] == 1, "last dim of x and weight must be contiguous"
    assert x.get_device() == weight.get_device(), "x and weight must be on one device"
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == shape and out.dtype == dtype and out.stride()[-1] == 1, \
        "out must match x's shape and dtype, last dim contiguous"
    has_res = residual is not None
    if has_res:
        assert residual.shape == shape and residual.dtype == dtype and residual.stride()[-1] == 1, \
            "residual must match x (last dim contiguous)"
        if residual_out is None:
            residual_out = residual
        assert residual_out.shape == shape and residual_out.dtype == dtype and residual_out.stride()[-1] == 1, \
            "residual_out must match x (last dim contiguous)"
    else:
        residual_out = None
    if is_tracing(x):
        _rmsnorm_traced.op(x, weight, float(eps), residual, out, residual_out)
    else:
        meta = _PLANS.get((H, has_res))
        if meta is None:
            meta = _PLANS[(H, has_res)] = _meta(H, has_res)
        _launch(_rmsnorm_kernel, x, weight, float(eps), residual, out, residual_out, meta)
    return (out, residual_out) if has_res else out
