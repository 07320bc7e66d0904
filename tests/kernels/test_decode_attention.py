"""Split-KV decode attention: Triton kernel vs the float64 oracle; CUDA-graph replay on GPU."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from dreamllm_fast.kernels import reference as R  # noqa: E402
from dreamllm_fast.kernels.decode_attention import decode_attention  # noqa: E402
from kernel_helpers import DEVICE, assert_close_to_ref, cast_case, make_attention_case  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA; none found")

# (cache_lens, Hq, Hkv, D, dtype, num_splits): empty cache, 1, 63 and 200 cached tokens, split
# boundaries landing on the new token (64 with split_len 64), more splits than live tiles
CPU_CASES = [
    ([0, 1, 63, 200], 4, 4, 64, torch.float32, None),
    ([200, 64, 0], 4, 2, 128, torch.bfloat16, 3),
    ([63, 130], 2, 1, 64, torch.bfloat16, 1),
    ([127, 128, 64], 2, 2, 128, torch.float32, 8),
]
GPU_CASES = [  # (cache_lens, Hq, Hkv, D)
    ([2047], 32, 32, 128),
    ([0], 32, 32, 128),
    ([700, 1300], 32, 32, 128),
    ([5, 2000, 333, 64], 32, 8, 128),
]
GPU_DTYPES = [torch.float16, torch.bfloat16]


def _nan_equal(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def _args(c):
    return (c["q"], c["k"], c["v"], c["k_cache"], c["v_cache"], c["cache_lens"], c["slot_ids"], c["cos"], c["sin"])


def run_decode_case(cache_lens, hq, hkv, d, dtype, num_splits, max_seq):
    base = make_attention_case([1] * len(cache_lens), cache_lens, hq, hkv, d, torch.float32, max_seq)
    lp = cast_case(base, dtype)
    ref64_case, lowp_case, kc = cast_case(lp, torch.float64), cast_case(lp, dtype), cast_case(lp, dtype)
    ref64 = R.decode_attention_ref(*_args(ref64_case))
    lowp = R.decode_attention_ref(*_args(lowp_case))
    out = torch.full_like(lp["q"], float("nan"))
    got = decode_attention(*_args(kc), num_splits=num_splits, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close_to_ref("decode out", got, ref64, lowp, dtype)
    written = torch.zeros(kc["k_cache"].shape[:2], dtype=torch.bool, device=DEVICE)
    for b, L in enumerate(cache_lens):
        written[int(lp["slot_ids"][b]), L] = True
    assert_close_to_ref("decode k_cache", kc["k_cache"][written], ref64_case["k_cache"][written],
                        lowp_case["k_cache"][written], dtype)
    assert torch.equal(kc["v_cache"][written], lowp_case["v_cache"][written])
    assert _nan_equal(kc["k_cache"][~written], lp["k_cache"][~written]), "k_cache touched elsewhere"
    assert _nan_equal(kc["v_cache"][~written], lp["v_cache"][~written]), "v_cache touched elsewhere"
    assert kc["cache_lens"].tolist() == list(cache_lens), "decode must not increment cache_lens"


@pytest.mark.parametrize("cache_lens,hq,hkv,d,dtype,num_splits", CPU_CASES)
def test_decode_attention_cpu(cache_lens, hq, hkv, d, dtype, num_splits):
    run_decode_case(cache_lens, hq, hkv, d, dtype, num_splits, max_seq=264)


@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("cache_lens,hq,hkv,d", GPU_CASES)
def test_decode_attention_gpu_real_shapes(cache_lens, hq, hkv, d, dtype):
    run_decode_case(cache_lens, hq, hkv, d, dtype, None, max_seq=2048)


@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_decode_attention_cuda_graph_replay(dtype):
    """Capture once, zero the output, replay with cache_lens changed on device; compare to eager."""
    cache_lens = [100, 1500]
    c = cast_case(make_attention_case([1, 1], cache_lens, 32, 32, 128, torch.float32, 2048), dtype)
    out = torch.empty_like(c["q"])
    args = _args(c)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compile, allocate the cached scratch
            decode_attention(*args, out=out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(*args, out=out)
    for step in range(3):
        c["cache_lens"].copy_(torch.tensor([100 + 7 * step, 1500 + 200 * step], dtype=torch.int32))
        c["q"].normal_()
        c["k"].normal_()
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        eager = decode_attention(*args)  # rewrites the same cache position with the same values
        torch.testing.assert_close(out, eager, atol=0, rtol=0)
        ref = R.decode_attention_ref(*_args(cast_case(c, torch.float64)))
        assert (out.double() - ref).abs().max() < 2e-2
