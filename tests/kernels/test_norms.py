"""RMSNorm (+ fused residual add) and SwiGLU Triton kernels vs the torch oracles."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from dreamllm_fast.kernels import reference as R  # noqa: E402
from dreamllm_fast.kernels.rmsnorm import rmsnorm  # noqa: E402
from dreamllm_fast.kernels.swiglu import silu_and_mul  # noqa: E402
from kernel_helpers import DEVICE, assert_close_to_ref  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 64), (7, 111), (5, 769)]  # (rows, hidden): awkward, non-power-of-two widths
GPU_SHAPES = [(1, 4096), (770, 4096), (258, 4096)]
GPU_DTYPES = [torch.float16, torch.bfloat16]


def _check_rmsnorm(rows, h, dtype, residual):
    # strided input: a slice of a tensor twice as wide
    base = torch.randn(rows, 2 * h, device=DEVICE)
    x64 = base[:, :h].double()
    w64 = torch.randn(h, device=DEVICE).double()
    r64 = torch.randn(rows, h, device=DEVICE).double()
    x, w, r = base.to(dtype)[:, :h], w64.to(dtype), r64.to(dtype)
    out = torch.full((rows, h), float("nan"), dtype=dtype, device=DEVICE)
    lowp_r = r.clone()
    ref64_r = r.double()
    ref64 = R.rmsnorm_ref(x.double(), w.double(), 1e-6, residual=ref64_r if residual else None)
    lowp = R.rmsnorm_ref(x, w, 1e-6, residual=lowp_r if residual else None)
    if residual:
        r_out = torch.full_like(r, float("nan"))
        got, h_got = rmsnorm(x, w, 1e-6, residual=r, out=out, residual_out=r_out)
        assert got.data_ptr() == out.data_ptr() and h_got.data_ptr() == r_out.data_ptr()
        assert torch.equal(h_got, lowp_r), "h = x + residual must round exactly like torch"
        assert_close_to_ref("rmsnorm+res", got, ref64[0], lowp[0], dtype)
        # in-place variant
        r2 = r.clone()
        got2, h2 = rmsnorm(x, w, 1e-6, residual=r2)
        assert h2.data_ptr() == r2.data_ptr() and torch.equal(r2, lowp_r)
        assert torch.equal(got2, got)
    else:
        got = rmsnorm(x, w, 1e-6, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert_close_to_ref("rmsnorm", got, ref64, lowp, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,h", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm(rows, h, dtype, residual):
    _check_rmsnorm(rows, h, dtype, residual)


def _check_swiglu(rows, f, dtype):
    gu64 = torch.randn(rows, 2 * f, device=DEVICE).double() * 3
    gu = gu64.to(dtype)
    out = torch.full((rows, f), float("nan"), dtype=dtype, device=DEVICE)
    got = silu_and_mul(gu, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close_to_ref("silu_and_mul", got, R.silu_and_mul_ref(gu.double()), R.silu_and_mul_ref(gu), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,f", [(1, 64), (7, 111), (3, 1500)])
def test_silu_and_mul(rows, f, dtype):
    _check_swiglu(rows, f, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA; none found")
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows,h", GPU_SHAPES)
def test_norms_gpu_real_shapes(rows, h, dtype):
    _check_rmsnorm(rows, h, dtype, residual=True)
    _check_rmsnorm(rows, h, dtype, residual=False)
    _check_swiglu(rows, 11008, dtype)
