"""SwiGLU activation: out = silu(gate) * up from the fused [gate | up] projection output."""
import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne
from ._utils import cdiv, is_interpret, is_tracing, next_pow2, plan_cache, register_triton_op, wrap


@triton.jit
def _silu_and_mul_kernel(
    # pointers
    gu_ptr, out_ptr,
    # sizes
    F,
    # strides
    stride_gu, stride_out,
    # meta
    BLOCK_F: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + F + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u  # fp32 math, one rounding at the store
    tl.store(out_ptr + row * stride_out + cols, cast_rne(y, out_ptr.dtype.element_ty, IS_INTERPRET), mask=mask)


def _meta(F: int):
    """(column programs, constexprs/options) for F output columns."""
    block = min(1024, next_pow2(F))
    return cdiv(F, block), dict(BLOCK_F=block, IS_INTERPRET=is_interpret(), num_warps=4)


_PLANS = plan_cache()  # F -> (column programs, meta)


def _launch(kernel, gate_up, out, plan):
    F = out.shape[-1]
    if gate_up.dim() == 2:
        rows, s_gu, s_out = gate_up.shape[0], gate_up.stride(0), out.stride(0)
    else:
        x2, o2 = gate_up.view(-1, 2 * F), out.view(-1, F)
        rows, s_gu, s_out = x2.shape[0], x2.stride(0), o2.stride(0)
    if rows > 0:
        kernel[(rows, plan[0])](gate_up, out, F, s_gu, s_out, **plan[1])


@register_triton_op("silu_and_mul", mutates_args=("out",))
def _silu_and_mul_traced(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    _launch(wrap(_silu_and_mul_kernel), gate_up, out, _meta(out.shape[-1]))


def silu_and_mul(gate_up, out=None):
    """gate_up: [T, 2F] (gate = first F columns, up = last F; last dim contiguous) -> out: [T, F]."""
    assert gate_up.shape[-1] % 2 == 0, f"last dim must be 2F, got {gate_up.shape[-1]}"
    assert gate_up.stride(-1) == 1, "last dim of gate_up must be contiguous"
    F = gate_up.shape[-1] // 2
    if out is None:
        out = torch.empty(*gate_up.shape[:-1], F, dtype=gate_up.dtype, device=gate_up.device)
    assert out.shape == (*gate_up.shape[:-1], F) and out.stride(-1) == 1, "out must be [T, F], last dim contiguous"
    assert out.dtype == gate_up.dtype, "out must have gate_up's dtype"
    if is_tracing(gate_up):
        _silu_and_mul_traced.op(gate_up, out)
    else:
        plan = _PLANS.get(F)
        if plan is None:
            plan = _PLANS[F] = _meta(F)
        _launch(_silu_and_mul_kernel, gate_up, out, plan)
    return out
