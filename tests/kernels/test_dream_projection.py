"""Dream projection (gather + final RMSNorm + projector) vs the float64 oracle."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from dreamllm_fast.kernels import reference as R  # noqa: E402
from dreamllm_fast.kernels.dream_projection import dream_projection  # noqa: E402
from kernel_helpers import DEVICE, assert_close_to_ref  # noqa: E402

CPU_CASES = [  # (T, H, N, C, dtype)
    (37, 200, 5, 48, torch.float32),
    (70, 128, 17, 40, torch.bfloat16),
]
GPU_CASES = [(770, 4096, 64, 1024), (324, 4096, 64, 1024), (80, 4096, 7, 1024)]
GPU_DTYPES = [torch.float16, torch.bfloat16]


def run_case(T, H, N, C, dtype):
    hidden = (torch.randn(T, H, device=DEVICE) * 3).to(dtype)
    rows = torch.randperm(T, device=DEVICE)[:N].to(torch.int64)
    nw = (1 + 0.3 * torch.randn(H, device=DEVICE)).to(dtype)
    pw = (torch.randn(C, H, device=DEVICE) / H ** 0.5).to(dtype)
    buf = torch.full((2, N, C), float("nan"), dtype=dtype, device=DEVICE)  # [uncond; cond]
    got = dream_projection(hidden, rows, nw, pw, 1e-6, out=buf[1])
    assert got.data_ptr() == buf[1].data_ptr()
    assert torch.isnan(buf[0]).all(), "wrote outside out"
    ref64 = R.dream_projection_ref(hidden.double(), rows, nw.double(), pw.double(), 1e-6)
    lowp = R.dream_projection_ref(hidden, rows, nw, pw, 1e-6)
    assert_close_to_ref("dream_projection", got, ref64, lowp, dtype)
    # transposed out view (column-major strides)
    out_t = torch.full((C, N), float("nan"), dtype=dtype, device=DEVICE)
    got_t = dream_projection(hidden, rows, nw, pw, 1e-6, out=out_t.t())
    assert torch.equal(got_t, got)


@pytest.mark.parametrize("T,H,N,C,dtype", CPU_CASES)
def test_dream_projection_cpu(T, H, N, C, dtype):
    run_case(T, H, N, C, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA; none found")
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("T,H,N,C", GPU_CASES)
def test_dream_projection_gpu_real_shapes(T, H, N, C, dtype):
    run_case(T, H, N, C, dtype)
