"""The torch oracles are also the engine's CPU fallback: check them against naive float64 math."""
import math

import pytest

pytest.importorskip("triton")  # house rule for kernel test modules (the references need only torch)

import torch  # noqa: E402

from dreamllm_fast.kernels import reference as R  # noqa: E402
from kernel_helpers import cast_case, make_attention_case, naive_attention64  # noqa: E402

ATTN_CASES = [  # (q_lens, cache_lens, Hq, Hkv, D)
    ([7, 1, 65], [0, 63, 1], 4, 4, 64),
    ([3, 5], [200, 0], 4, 2, 128),
]


def test_rope_tables_match_float64():
    cos, sin = R.rope_cos_sin_ref(2048, 128, 10000.0)
    assert cos.shape == (2048, 64) and cos.dtype == torch.float32
    inv = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    ang = torch.arange(2048, dtype=torch.float64)[:, None] * inv
    # fp32 angles (as HF computes them) lose ~p * 6e-8 rad: 1.2e-4 at p = 2047.
    assert (cos.double() - ang.cos()).abs().max() < 3e-4
    assert (sin.double() - ang.sin()).abs().max() < 3e-4
    assert (cos[:64].double() - ang[:64].cos()).abs().max() < 1e-5


@pytest.mark.parametrize("q_lens,cache_lens,hq,hkv,d", ATTN_CASES)
def test_append_attention_ref_matches_naive(q_lens, cache_lens, hq, hkv, d):
    case = make_attention_case(q_lens, cache_lens, hq, hkv, d, torch.float64, max_seq=272, device="cpu")
    want, want_k = naive_attention64(case)
    c = cast_case(case, torch.float64)
    got = R.append_attention_ref(**c)
    assert (got - want).abs().max() < 1e-12
    cu = case["cu_seqlens_q"].tolist()
    for b, L in enumerate(cache_lens):
        s = int(case["slot_ids"][b])
        n = q_lens[b]
        assert torch.equal(c["v_cache"][s, L:L + n], case["v"][cu[b]:cu[b + 1]])
        assert (c["k_cache"][s, L:L + n] - want_k[cu[b]:cu[b + 1]]).abs().max() < 1e-12
        assert torch.isnan(c["k_cache"][s, L + n:]).all(), "cache beyond the new tokens was touched"
    # fp32 fallback is exact fp32 math: close to fp64 at fp32 precision.
    c32 = cast_case(case, torch.float32)
    got32 = R.append_attention_ref(**c32)
    err = (got32.double() - want).abs().max().item()
    print(f"append ref fp32 vs naive fp64: {err:.2e}")
    assert err < 1e-5


def test_decode_attention_ref_matches_naive():
    case = make_attention_case([1, 1, 1], [0, 1, 200], 4, 2, 64, torch.float64, max_seq=208, device="cpu")
    want, _ = naive_attention64(case)
    c = cast_case(case, torch.float64)
    got = R.decode_attention_ref(c["q"], c["k"], c["v"], c["k_cache"], c["v_cache"], c["cache_lens"],
                                 c["slot_ids"], c["cos"], c["sin"])
    assert (got - want).abs().max() < 1e-12
    assert case["cache_lens"].tolist() == [0, 1, 200], "decode must not increment cache_lens"


def test_rmsnorm_ref_matches_hf_math():
    x = torch.randn(5, 96, dtype=torch.float64)
    w = torch.randn(96, dtype=torch.float64)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert (R.rmsnorm_ref(x, w, 1e-6) - want).abs().max() < 1e-12
    r = torch.randn_like(x)
    r0 = r.clone()
    normed, h = R.rmsnorm_ref(x, w, 1e-6, residual=r)
    assert torch.equal(r, x + r0) and h.data_ptr() == r.data_ptr(), "residual must be updated in place"
    h_want = x + r0
    assert (normed - h_want / torch.sqrt(h_want.pow(2).mean(-1, keepdim=True) + 1e-6) * w).abs().max() < 1e-12
    # bf16: HF casts the normalized value to bf16 before the weight multiply.
    xb, wb = x.bfloat16(), w.bfloat16()
    hf = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * wb
    assert torch.equal(R.rmsnorm_ref(xb, wb, 1e-6), hf)


def test_silu_and_mul_and_dream_projection_ref():
    gu = torch.randn(3, 2 * 40, dtype=torch.float64)
    want = gu[:, :40] / (1 + torch.exp(-gu[:, :40])) * gu[:, 40:]
    assert (R.silu_and_mul_ref(gu) - want).abs().max() < 1e-12
    hidden = torch.randn(20, 48, dtype=torch.float64)
    rows = torch.tensor([3, 4, 5, 19])
    nw, pw = torch.randn(48, dtype=torch.float64), torch.randn(24, 48, dtype=torch.float64)
    x = hidden[rows]
    want = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * nw) @ pw.t()
    buf = torch.full((2, 4, 24), float("nan"), dtype=torch.float64)
    got = R.dream_projection_ref(hidden, rows, nw, pw, 1e-6, out=buf[1])
    assert got.data_ptr() == buf[1].data_ptr() and (got - want).abs().max() < 1e-12
    assert torch.isnan(buf[0]).all()


def test_sm_scale_is_used():
    case = make_attention_case([4], [3], 2, 2, 64, torch.float64, max_seq=16, device="cpu")
    a = R.append_attention_ref(**cast_case(case, torch.float64))
    b = R.append_attention_ref(**cast_case(case, torch.float64), sm_scale=0.5 / math.sqrt(64))
    assert (a - b).abs().max() > 1e-3
