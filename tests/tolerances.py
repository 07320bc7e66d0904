"""Per-dtype tolerance table shared by kernel tests.

The primary rule is relative to the framework's own error:
    max|kernel - ref64| <= 2 * max|lowp_torch - ref64| + NOISE_FLOOR[dtype]
where ref64 is the torch oracle in float64 and lowp_torch the same oracle run in the test dtype.
ATOL/RTOL are the fallback for comparisons that have no low-precision torch twin.
"""
import torch

NOISE_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}

# (atol, rtol) fallback table, vLLM allclose_default style.
ATOL_RTOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
