"""Weight-only quantized linear (int8 / fp8 e4m3, per-channel scales) vs a float64 oracle.

Rule (kernel_helpers.py): max|kernel - ref64| <= 2 * max|torch lowp - ref64| + noise floor, where ref64
is the float64 product of x and the dequantized weight and "torch lowp" is torch's own matmul in
the test dtype of the dequantized weight (F.linear(x, (Q * s).to(dtype))). The kernel rounds
once (after the fp32 reduction and the scale), torch rounds the dequantized weight and the output,
so the kernel is usually well inside the bound. Measured in interpreter mode (2-core CPU), kernel
max error / torch max error: int8 bf16 K=257 split-K 2.8e-2 / 3.6e-2 (outputs ~ +-30: one outlier
row x8), int8 fp32 7.4e-7 / 7.4e-7, fp8 bf16 3.0e-2 / 3.6e-2, fp8 fp32 3.0e-6 / 3.1e-6.

CPU: interpreter mode (tiny awkward shapes, both plans: the skinny split-K decode plan at
M <= 16 and the tiled prefill plan above). GPU: the 7B call sites' shapes.
"""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dreamllm_fast.config import WeightFormat  # noqa: E402
from dreamllm_fast.errors import InvalidInputError  # noqa: E402
from dreamllm_fast.kernels import reference as R  # noqa: E402
from dreamllm_fast.kernels.quant_linear import _meta, default_num_splits, quant_linear  # noqa: E402
from dreamllm_fast.quant import check_device_supports, quantize  # noqa: E402
from kernel_helpers import DEVICE, HAS_CUDA, assert_close_to_ref, requires_triton_device  # noqa: E402

pytestmark = requires_triton_device

CPU_CASES = [  # (M, N, K, dtype, fmt, split_k)
    (1, 59, 77, torch.float32, "int8", None),
    (3, 111, 257, torch.bfloat16, "int8", None),
    (16, 70, 130, torch.bfloat16, "int8", 3),  # forced split-K: 3 splits of 64, 64, 2 columns
    (17, 45, 96, torch.float32, "int8", None),  # first row count of the prefill plan
    (37, 70, 130, torch.bfloat16, "int8", None),
    (5, 64, 200, torch.bfloat16, "fp8", 4),
    (20, 33, 65, torch.float32, "fp8", None),
]
GPU_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32008, 4096)]  # (N, K) 7B
GPU_ROWS = [1, 2, 7, 16, 65, 770]
FP8_OK = HAS_CUDA and torch.cuda.get_device_capability() >= (8, 9)


def _weights(N, K, fmt, device=DEVICE):
    w = torch.randn(N, K, device=device) / K ** 0.5
    w[N // 2] *= 8.0  # one outlier row: per-channel scales must not share it
    return quantize(w.to(torch.bfloat16), fmt)


def run_case(M, N, K, dtype, fmt, split_k, x=None):
    qw = _weights(N, K, fmt)
    if x is None:
        x = torch.randn(M, K, device=DEVICE).to(dtype)
    buf = torch.full((M, 2 * N), float("nan"), dtype=dtype, device=DEVICE)
    out = buf[:, N:]  # a strided view: the other half must stay poisoned
    got = quant_linear(x, qw.qweight, qw.scale, out=out, split_k=split_k)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isnan(buf[:, :N]).all(), "wrote outside out"
    ref64 = R.quant_linear_ref(x.double(), qw.qweight, qw.scale)
    lowp = F.linear(x, qw.dequantize(dtype))  # torch's own matmul of the dequantized weight
    assert_close_to_ref(f"quant_linear {fmt} M={M} N={N} K={K}", got, ref64, lowp, dtype)
    again = quant_linear(x, qw.qweight, qw.scale, split_k=split_k)
    assert torch.equal(again, got), "split-K must be deterministic (fixed reduction order)"
    return got


@pytest.mark.parametrize("M,N,K,dtype,fmt,split_k", CPU_CASES)
def test_quant_linear_cpu(M, N, K, dtype, fmt, split_k):
    if HAS_CUDA and fmt == "fp8" and not FP8_OK:
        pytest.skip("fp8 needs compute capability >= 8.9")
    run_case(M, N, K, dtype, fmt, split_k)


def test_split_case_really_splits_and_prefill_does_not():
    # the parametrized cases above cover both plans only if these hold
    assert _meta(16, 70, 130, False, 4, 3)[4] == 3
    assert _meta(3, 111, 257, False, 4)[4] > 1  # default split at the interpreter's 4 stand-in SMs
    assert _meta(37, 70, 130, False, 4)[4] == 1
    # the heuristic's 7B figures (its docstring): o_proj 64 tiles x 32 K tiles -> 8, q|k|v 192 -> 2,
    # the LM head 501 -> 1, on 132 SMs
    assert [default_num_splits(t, 32, 132) for t in (64, 192, 501)] == [8, 2, 1]


def test_strided_and_3d_inputs():
    wide = torch.randn(6, 2 * 96, device=DEVICE).to(torch.bfloat16)
    run_case(6, 40, 96, torch.bfloat16, "int8", None, x=wide[:, 96:])  # rows with stride 192
    qw = _weights(40, 96, "int8")
    x3 = torch.randn(2, 5, 96, device=DEVICE)
    got = quant_linear(x3, qw.qweight, qw.scale)
    assert got.shape == (2, 5, 40)
    assert torch.equal(got.view(10, 40), quant_linear(x3.view(10, 96), qw.qweight, qw.scale))


def test_bad_inputs_name_the_problem():
    qw = _weights(8, 32, "int8")
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(AssertionError, match="scale must be"):
        quant_linear(x, qw.qweight, qw.scale.half())
    with pytest.raises(AssertionError, match="int8 or float8"):
        quant_linear(x, qw.qweight.float(), qw.scale)
    with pytest.raises(AssertionError, match=r"qweight must be \[N, 16\]"):
        quant_linear(x[:, :16], qw.qweight, qw.scale)


# -- quantization ---------------------------------------------------------------------------
def test_int8_quantization_is_symmetric_per_channel_and_within_half_a_step():
    w = torch.randn(33, 70)
    w[3] *= 100.0
    w[5] = 0.0
    qw = quantize(w, "int8")
    assert qw.qweight.dtype == torch.int8 and qw.scale.shape == (33,) and qw.scale.dtype == torch.float32
    assert qw.qweight.abs().max() <= 127 and (qw.qweight.abs().amax(1)[torch.arange(33) != 5] == 127).all()
    err = (qw.dequantize(torch.float64) - w.double()).abs()
    assert (err <= qw.scale.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert (qw.qweight[5] == 0).all() and torch.isfinite(qw.scale).all()


def test_fp8_quantization_relative_error():
    w = torch.randn(17, 64)
    qw = quantize(w, "fp8")
    assert qw.qweight.dtype == torch.float8_e4m3fn
    assert torch.allclose(qw.qweight.float().abs().amax(1), torch.full((17,), 448.0))
    d = qw.dequantize(torch.float64)
    # e4m3: 3 mantissa bits -> relative rounding <= 2^-4 on normal values; subnormals (below
    # 2^-6 of the scale) round to a step of 2^-9 * scale
    bound = torch.maximum(w.double().abs() * 2.0 ** -4, qw.scale.double()[:, None] * 2.0 ** -10)
    assert ((d - w.double()).abs() <= bound * (1 + 1e-6)).all()


def test_fp8_refused_below_sm89(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(InvalidInputError, match=r"compute capability >= 8.9.*sm_80.*int8"):
        check_device_supports("fp8", "cuda:0")
    check_device_supports("int8", "cuda:0")  # int8 runs on sm_80
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_device_supports(WeightFormat.FP8, "cuda:0")
    check_device_supports("fp8", "cpu")  # the reference path


# -- GPU: real shapes and graph capture -------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU with CUDA; none found")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K", GPU_SHAPES)
@pytest.mark.parametrize("M", GPU_ROWS)
def test_quant_linear_gpu_real_shapes(M, N, K, dtype, fmt):
    if fmt == "fp8" and not FP8_OK:
        pytest.skip("fp8 needs compute capability >= 8.9")
    run_case(M, N, K, dtype, fmt, None)


@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU with CUDA; none found")
@pytest.mark.parametrize("M", [1, 16, 96])
def test_quant_linear_graph_replay_matches_eager(M):
    N, K = 4096, 4096  # o_proj: split-K at decode sizes
    qw = _weights(N, K, "int8")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    eager = quant_linear(x, qw.qweight, qw.scale)  # warm-up: plan + scratch before capture
    out = torch.empty_like(eager)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        quant_linear(x, qw.qweight, qw.scale, out=out)
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
