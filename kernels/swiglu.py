"""SwiGLU activation: out = silu(gate) * up from the fused [gate | up] projection output."""
import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne
from ._utils import is_interpret, jit, launch, next_pow2, register_triton_op


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


@register_triton_op("silu_and_mul", mutates_args=("out",))
def _silu_and_mul_launch(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    F = out.shape[-1]
    x2, o2 = gate_up.view(-1, 2 * F), out.view(-1, F)
    BLOCK_F = min(1024, next_pow2(F))
    if x2.shape[0] > 0:
        jit(_silu_and_mul_kernel)[(x2.shape[0], triton.cdiv(F, BLOCK_F))](
            x2, o2, F, x2.stride(0), o2.stride(0), BLOCK_F=BLOCK_F, IS_INTERPRET=is_interpret(), num_warps=4,
        )


def silu_and_mul(gate_up, out=None):
    """gate_up: [T, 2F] (gate = first F columns, up = last F; last dim contiguous) -> out: [T, F]."""
    assert gate_up.shape[-1] % 2 == 0, f"last dim must be 2F, got {gate_up.shape[-1]}"
    assert gate_up.stride(-1) == 1, "last dim of gate_up must be contiguous"
    F = gate_up.shape[-1] // 2
    if out is None:
        out = torch.empty(*gate_up.shape[:-1], F, dtype=gate_up.dtype, device=gate_up.device)
    assert out.shape == (*gate_up.shape[:-1], F) and out.stride(-1) == 1, "out must be [T, F], last dim contiguous"
    assert out.dtype == gate_up.dtype, "out must have gate_up's dtype"
    launch(_silu_and_mul_launch, gate_up, out)
    return out
