"""Dream-query conditioning in one launch: gather rows, final RMSNorm, bias-free projection.

out[i] = (RMSNorm(hidden[rows[i]]) * norm_weight) @ proj_weight^T, HF rounding: fp32 statistics,
normalized value cast to the activation dtype, times the weight in that dtype, then a matmul with
fp32 accumulation. At 7B shapes ([64, 4096] x [4096 -> 1024]) the op is an 8 MB weight read: the
grid splits C finely so enough programs stream the weight; each program recomputes the 64 row norms
from L2 (512 KB of activations) instead of paying a second launch.
"""
import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne
from ._utils import cdiv, is_interpret, is_tracing, next_pow2, num_sms, plan_cache, register_triton_op, wrap


@triton.jit
def _dream_projection_kernel(
    # pointers
    hidden_ptr, rows_ptr, nw_ptr, pw_ptr, out_ptr,
    # sizes
    N, H, C, eps,
    # strides
    stride_ht, stride_pc, stride_on, stride_oc,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # Inductor types Python floats fp64 (torch 2.11-2.14)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = offs_m < N
    c_ok = offs_c < C
    rows = tl.load(rows_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    x_base = hidden_ptr + rows[:, None] * stride_ht

    # pass 1: fp32 sum of squares of the gathered rows
    ss = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_base + offs_k[None, :], mask=m_ok[:, None] & (offs_k < H)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, 1)
    rstd = 1.0 / tl.sqrt(ss / H + eps)

    # pass 2: normalize (HF rounding) and multiply by proj_weight^T tiles
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        x = tl.load(x_base + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        xn = cast_rne(x * rstd[:, None], hidden_ptr.dtype.element_ty, IS_INTERPRET).to(tl.float32)
        w = tl.load(nw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        a = cast_rne(xn * w[None, :], hidden_ptr.dtype.element_ty, IS_INTERPRET)
        wt = tl.load(pw_ptr + offs_c[None, :] * stride_pc + offs_k[:, None], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        if IS_INTERPRET:  # no bf16 arithmetic in the interpreter; values are already bf16-exact
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PREC)
    op = out_ptr + offs_m[:, None] * stride_on + offs_c[None, :] * stride_oc
    tl.store(op, cast_rne(acc, out_ptr.dtype.element_ty, IS_INTERPRET), mask=m_ok[:, None] & c_ok[None, :])


def _meta(N: int, C: int, is_fp32: bool, sms: int):
    """(grid, constexprs/options) for N rows and C outputs (shapes and the SM count only)."""
    interp = is_interpret()
    block_m = max(16, min(64, next_pow2(N)))
    if interp:
        block_c, block_k = min(64, max(16, next_pow2(C))), 64
    else:
        # enough programs to stream the weight with every SM (7B: 64 rows, C = 1024 -> BLOCK_C 16)
        block_k = 64 if is_fp32 else 128
        block_c = 16
        for bc in (64, 32):
            if cdiv(N, block_m) * cdiv(C, bc) >= sms:
                block_c = bc
                break
    grid = (cdiv(N, block_m), cdiv(C, block_c))
    return grid, dict(BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=block_k, DOT_PREC="ieee" if is_fp32 else "tf32",
                      IS_INTERPRET=interp, num_warps=4, num_stages=3 if not interp else 1)


_PLANS = plan_cache()  # (N, C, dtype, device) -> (grid, meta)


def _launch(kernel, hidden, rows, norm_weight, proj_weight, eps, out, plan):
    H = hidden.shape[1]
    kernel[plan[0]](hidden, rows, norm_weight, proj_weight, out, rows.shape[0], H, proj_weight.shape[0], eps,
                    hidden.stride(0), proj_weight.stride(0), out.stride(0), out.stride(1), **plan[1])


@register_triton_op("dream_projection", mutates_args=("out",))
def _dream_projection_traced(hidden: torch.Tensor, rows: torch.Tensor, norm_weight: torch.Tensor,
                             proj_weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    plan = _meta(rows.shape[0], proj_weight.shape[0], hidden.dtype == torch.float32, num_sms(hidden.device))
    _launch(wrap(_dream_projection_kernel), hidden, rows, norm_weight, proj_weight, eps, out, plan)


def dream_projection(hidden, rows, norm_weight, proj_weight, eps, out=None):
    """Gather + final RMSNorm + bias-free Linear H -> C, one launch.

    hidden: [T, H] (last decoder layer output before the final norm; last dim contiguous);
    rows: [N] int64 row indices; norm_weight: [H]; proj_weight: [C, H] (last dim contiguous), same
    dtype as hidden. out: [N, C] in hidden's dtype with any strides (e.g. buf[1] of a [2, N, C]
    guidance buffer) or None. Returns out.
    """
    assert hidden.dim() == 2 and hidden.stride(-1) == 1, "hidden must be [T, H] with a contiguous last dim"
    T, H = hidden.shape
    C = proj_weight.shape[0]
    assert rows.dim() == 1 and rows.dtype in (torch.int64, torch.int32), "rows must be [N] int64/int32"
    assert norm_weight.shape == (H,) and norm_weight.stride(-1) == 1, f"norm_weight must be [{H}]"
    assert proj_weight.shape == (C, H) and proj_weight.stride(-1) == 1, f"proj_weight must be [C, {H}], last dim contiguous"
    assert proj_weight.dtype == hidden.dtype, "proj_weight must have hidden's dtype"
    dev = hidden.device
    assert rows.device == dev and norm_weight.device == dev and proj_weight.device == dev, "all tensors on one device"
    N = rows.shape[0]
    if out is None:
        out = torch.empty(N, C, dtype=hidden.dtype, device=dev)
    assert out.shape == (N, C) and out.dtype == hidden.dtype, f"out must be [{N}, {C}] in hidden's dtype"
    if N == 0:
        return out
    if is_tracing(hidden):
        _dream_projection_traced.op(hidden, rows, norm_weight, proj_weight, float(eps), out)
        return out
    key = (N, C, hidden.dtype, dev)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _meta(N, C, hidden.dtype == torch.float32, num_sms(dev))
    _launch(_dream_projection_kernel, hidden, rows, norm_weight, proj_weight, float(eps), out, plan)
    return out
