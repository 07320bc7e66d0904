"""Append (chunked-prefill) attention: Triton kernel vs the float64 oracle, NaN-poisoned caches."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from dreamllm_fast.kernels import reference as R  # noqa: E402
from dreamllm_fast.kernels.append_attention import append_attention  # noqa: E402
from kernel_helpers import DEVICE, assert_close_to_ref, cast_case, make_attention_case  # noqa: E402

# (q_lens, cache_lens, Hq, Hkv, D, dtype): packed unequal lengths, empty/odd/long prefixes
CPU_CASES = [
    ([7, 1, 65], [0, 63, 1], 4, 4, 64, torch.float32),
    ([130, 3], [200, 0], 4, 2, 128, torch.bfloat16),
    ([1, 7], [200, 63], 2, 1, 64, torch.bfloat16),
    ([65], [0], 2, 2, 128, torch.float32),
]
# GPU, real 7B shapes: 32 heads x 128, context 2048; dream-query chunk (64), image chunk (258),
# a packed [uncond; cond] pair of different lengths, plain prefill from an empty cache.
GPU_CASES = [
    ([64], [1984], 32, 32, 128),
    ([258], [1790], 32, 32, 128),
    ([66, 66], [700, 1200], 32, 32, 128),
    ([770], [0], 32, 32, 128),
    ([258, 64], [0, 1500], 32, 8, 128),
]
GPU_DTYPES = [torch.float16, torch.bfloat16]


def _nan_equal(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def run_append_case(q_lens, cache_lens, hq, hkv, d, dtype, max_seq, sm_scale=None):
    base = make_attention_case(q_lens, cache_lens, hq, hkv, d, torch.float32, max_seq)
    lp = cast_case(base, dtype)
    ref64_case = cast_case(lp, torch.float64)
    ref64 = R.append_attention_ref(**ref64_case, sm_scale=sm_scale)
    lowp_case = cast_case(lp, dtype)
    lowp = R.append_attention_ref(**lowp_case, sm_scale=sm_scale)
    kc = cast_case(lp, dtype)
    out = torch.full_like(lp["q"], float("nan"))
    got = append_attention(**kc, sm_scale=sm_scale, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close_to_ref("append out", got, ref64, lowp, dtype)
    # cache: written positions hold rotated k / raw v, everything else is bit-for-bit untouched
    written = torch.zeros(kc["k_cache"].shape[:2], dtype=torch.bool, device=DEVICE)
    for b, L in enumerate(cache_lens):
        written[int(lp["slot_ids"][b]), L:L + q_lens[b]] = True
    assert_close_to_ref("append k_cache", kc["k_cache"][written], ref64_case["k_cache"][written],
                        lowp_case["k_cache"][written], dtype)
    assert torch.equal(kc["v_cache"][written], lowp_case["v_cache"][written])
    assert _nan_equal(kc["k_cache"][~written], lp["k_cache"][~written]), "k_cache touched outside the chunk"
    assert _nan_equal(kc["v_cache"][~written], lp["v_cache"][~written]), "v_cache touched outside the chunk"
    assert kc["cache_lens"].tolist() == list(cache_lens), "cache_lens must not be incremented"


@pytest.mark.parametrize("q_lens,cache_lens,hq,hkv,d,dtype", CPU_CASES)
def test_append_attention_cpu(q_lens, cache_lens, hq, hkv, d, dtype):
    run_append_case(q_lens, cache_lens, hq, hkv, d, dtype, max_seq=336)


def test_append_attention_sm_scale():
    run_append_case([9], [5], 2, 2, 64, torch.float32, max_seq=32, sm_scale=0.3)


def test_append_attention_strided_cache_and_out():
    """Caches as a view of a [layers, ...] stack and q/out as slices of wider tensors."""
    base = make_attention_case([5, 9], [3, 17], 2, 2, 64, torch.float32, 48)
    stack_k = torch.full((2, *base["k_cache"].shape), float("nan"), device=DEVICE)
    stack_v = torch.full_like(stack_k, float("nan"))
    stack_k[1], stack_v[1] = base["k_cache"], base["v_cache"]
    wide_q = torch.randn(base["q"].shape[0], 2, 2, 64, device=DEVICE)
    wide_q[:, 0] = base["q"]
    case = dict(base, q=wide_q[:, 0], k_cache=stack_k[1], v_cache=stack_v[1])
    wide_out = torch.full((base["q"].shape[0], 4, 64), float("nan"), device=DEVICE)
    got = append_attention(**case, out=wide_out[:, 1:3])
    want = R.append_attention_ref(**cast_case(base, torch.float64))
    assert (got.double() - want).abs().max() < 1e-5
    assert torch.isnan(wide_out[:, 0]).all() and torch.isnan(wide_out[:, 3]).all()
    assert torch.isnan(stack_k[0]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA; none found")
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("q_lens,cache_lens,hq,hkv,d", GPU_CASES)
def test_append_attention_gpu_real_shapes(q_lens, cache_lens, hq, hkv, d, dtype):
    run_append_case(q_lens, cache_lens, hq, hkv, d, dtype, max_seq=2048)
