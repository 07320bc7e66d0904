"""RMSNorm (HF LlamaRMSNorm math), optionally fused with the residual add.

One program per row; the whole row lives in registers (H = 4096 for Vicuna-7B), so one read of x
(and residual) and one write of each output: the op is bandwidth-bound and this is its floor.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne
from ._utils import is_interpret, jit, launch, next_pow2, register_triton_op, warps_for_block


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


@register_triton_op("rmsnorm", mutates_args=("out", "residual_out"))
def _rmsnorm_launch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor],
                    out: torch.Tensor, residual_out: Optional[torch.Tensor]) -> None:
    H = x.shape[-1]
    x2, y2 = x.view(-1, H), out.view(-1, H)
    has_res = residual is not None and residual_out is not None
    r2 = residual.view(-1, H) if has_res else x2  # unused when HAS_RESIDUAL=False
    ro2 = residual_out.view(-1, H) if has_res else x2
    BLOCK_N = next_pow2(H)
    if x2.shape[0] > 0:
        jit(_rmsnorm_kernel)[(x2.shape[0],)](
            x2, r2, ro2, weight, y2,
            H, eps,
            x2.stride(0), r2.stride(0), ro2.stride(0), y2.stride(0),
            HAS_RESIDUAL=has_res, BLOCK_N=BLOCK_N, IS_INTERPRET=is_interpret(),
            num_warps=warps_for_block(BLOCK_N),
        )


def rmsnorm(x, weight, eps, residual=None, out=None, residual_out=None):
    """RMSNorm over the last dim, fp32 statistics, output in x's dtype.

    x: [..., H] (last dim contiguous, flattenable with view(-1, H)); weight: [H]; residual,
    residual_out: like x or None; out: like x or None. Without residual returns normed [..., H].
    With residual computes h = x + residual (into residual_out, or in place into residual) and
    returns (normed, h).
    """
    H = x.shape[-1]
    assert weight.shape == (H,), f"weight must be [{H}], got {tuple(weight.shape)}"
    assert x.stride(-1) == 1 and weight.stride(-1) == 1, "last dim of x and weight must be contiguous"
    assert x.device == weight.device, "x and weight must be on one device"
    assert next_pow2(H) <= 65536, f"hidden size {H} too large for a one-pass row kernel"
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype, "out must match x's shape and dtype"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
        if residual_out is None:
            residual_out = residual
        assert residual_out.shape == x.shape and residual_out.dtype == x.dtype, "residual_out must match x"
    launch(_rmsnorm_launch, x, weight, float(eps), residual, out, residual_out if residual is not None else None)
    return (out, residual_out) if residual is not None else out
