"""@triton.jit helpers shared by several kernels."""
import triton
import triton.language as tl


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr, IS_INTERPRET: tl.constexpr):
    """Round fp32 ``x`` to DTYPE with round-to-nearest-even.

    Compiled Triton already rounds fp32 -> bf16 to nearest even. The CPU interpreter (triton 3.9)
    truncates instead (and its ``fp_downcast_rounding="rtne"`` path forgets the carry), which doubles
    bf16 errors, so under the interpreter only we round the fp32 bits ourselves first; the final cast
    is then exact.
    """
    if IS_INTERPRET:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
