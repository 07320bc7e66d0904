"""Helpers for kernel tests: case builders, NaN poisoning and the tolerance rule.

Imported as a plain module (pytest's default ``prepend`` import mode puts this folder on sys.path;
tests/ has no __init__.py).
"""
import math
import os

import pytest
import torch

try:  # tests/ on sys.path (conftest.py's folder, no __init__.py)
    from tolerances import ATOL_RTOL, NOISE_FLOOR
except ImportError:  # tests/ became a package
    from tests.tolerances import ATOL_RTOL, NOISE_FLOOR

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Where a Triton kernel can run: CUDA tensors on a GPU machine; CPU tensors only in interpreter mode
# (tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is present). Forcing Triton onto CPU tensors
# without the interpreter fails with "Pointer argument cannot be accessed from Triton (cpu tensor?)".
TRITON_DEVICE = "cuda" if HAS_CUDA else ("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)
requires_triton_device = pytest.mark.skipif(
    TRITON_DEVICE is None, reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1 (CPU interpreter); neither here")

__all__ = ["ATOL_RTOL", "NOISE_FLOOR", "DEVICE", "HAS_CUDA", "TRITON_DEVICE", "requires_triton_device",
           "assert_close_to_ref", "make_attention_case", "naive_attention64", "cast_case"]


def assert_close_to_ref(name, got, ref64, lowp, dtype, floor=None):
    """Tolerance rule: max|got - ref64| <= 2 max|lowp - ref64| + floor; prints the diffs first."""
    floor = NOISE_FLOOR[dtype] if floor is None else floor
    got64, lowp64 = got.double(), lowp.double()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values in the kernel output"
    err = (got64 - ref64).abs()
    lerr = (lowp64 - ref64).abs()
    bound = 2 * lerr.max().item() + floor
    print(f"{name} [{dtype}]: kernel max {err.max().item():.3e} mean {err.mean().item():.3e} | "
          f"torch-{dtype} max {lerr.max().item():.3e} mean {lerr.mean().item():.3e} | bound {bound:.3e}")
    assert err.max().item() <= bound, f"{name}: max err {err.max().item():.3e} > bound {bound:.3e}"


def make_attention_case(q_lens, cache_lens, hq, hkv, d, dtype, max_seq, device=DEVICE, seed=0, valid_lens=None):
    """Packed append/decode inputs with NaN-poisoned caches beyond each valid prefix.

    The valid prefix of sequence b holds random keys/values at positions [0, valid_lens[b])
    (default: cache_lens[b]); everything past it is NaN. A test that later advances cache_lens on
    the device (CUDA-graph replays) must pass valid_lens >= the largest length it will attend to,
    or the kernel reads poison (issue 10: every replayed output was NaN for that reason).
    Slots are assigned in reverse order, plus one extra slot that no sequence uses (stays all NaN).
    """
    valid_lens = list(cache_lens) if valid_lens is None else list(valid_lens)
    assert len(valid_lens) == len(cache_lens) and all(v >= c for v, c in zip(valid_lens, cache_lens)), \
        "valid_lens must cover cache_lens"
    g = torch.Generator(device="cpu").manual_seed(seed)
    b = len(q_lens)
    total = sum(q_lens)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(total, hq, d), rnd(total, hkv, d), rnd(total, hkv, d)
    num_slots = b + 1
    k_cache = torch.full((num_slots, max_seq, hkv, d), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    slot_ids = torch.arange(b, 0, -1, dtype=torch.int32)  # slot 0 is never used
    for i, L in enumerate(valid_lens):
        s = int(slot_ids[i])
        k_cache[s, :L] = rnd(L, hkv, d)
        v_cache[s, :L] = rnd(L, hkv, d)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    from dreamllm_fast.kernels.reference import rope_cos_sin_ref

    cos, sin = rope_cos_sin_ref(max_seq, d, 10000.0, device=device)
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu.to(device),
                cache_lens=torch.tensor(cache_lens, dtype=torch.int32, device=device),
                slot_ids=slot_ids.to(device), cos=cos, sin=sin, max_seqlen_q=max(q_lens))


def cast_case(case, dtype):
    """Copy of a case with float tensors (not the rope tables) cast to dtype and caches cloned."""
    out = dict(case)
    for key in ("q", "k", "v", "k_cache", "v_cache"):
        out[key] = case[key].to(dtype).clone()
    return out


def naive_attention64(case, sm_scale=None):
    """Independent float64 loop implementation of append attention (checks the reference itself).

    Returns (out [total_q, Hq, D], k_rot [total_q, Hkv, D]) in float64; the cache is not touched.
    """
    q, k, v = case["q"].double(), case["k"].double(), case["v"].double()
    cos, sin = case["cos"].double(), case["sin"].double()
    total, hq, d = q.shape
    hkv = k.shape[1]
    half = d // 2
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    out = torch.zeros(total, hq, d, dtype=torch.float64)
    k_rot_all = torch.zeros(total, hkv, d, dtype=torch.float64)
    cu = case["cu_seqlens_q"].tolist()

    def rot(x, p):  # x: [H, D]
        c, s = cos[p], sin[p]
        return torch.cat([x[:, :half] * c - x[:, half:] * s, x[:, half:] * c + x[:, :half] * s], -1)

    for bi, L in enumerate(case["cache_lens"].tolist()):
        slot = int(case["slot_ids"][bi])
        n = cu[bi + 1] - cu[bi]
        keys = case["k_cache"][slot, :L].double().cpu().tolist()
        vals = case["v_cache"][slot, :L].double().cpu().tolist()
        keys = torch.tensor(keys, dtype=torch.float64).reshape(L, hkv, d)
        vals = torch.tensor(vals, dtype=torch.float64).reshape(L, hkv, d)
        new_k = torch.stack([rot(k[cu[bi] + i].cpu(), L + i) for i in range(n)]) if n else keys[:0]
        k_rot_all[cu[bi]:cu[bi + 1]] = new_k
        keys = torch.cat([keys, new_k])
        vals = torch.cat([vals, v[cu[bi]:cu[bi + 1]].cpu()])
        for i in range(n):
            qi = rot(q[cu[bi] + i].cpu(), L + i)
            for h in range(hq):
                kv_h = h // (hq // hkv)
                sc = keys[: L + i + 1, kv_h] @ qi[h] * scale
                p = torch.exp(sc - sc.max())
                out[cu[bi] + i, h] = (p / p.sum()) @ vals[: L + i + 1, kv_h]
    return out, k_rot_all
