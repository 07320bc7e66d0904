"""Torch-only oracles for every kernel in this folder (imports only torch).

Each ``<op>_ref`` has the same signature and semantics as the Triton launcher ``<op>`` and is also
the engine's CPU fallback, so it follows Hugging Face LLaMA math exactly:

- RMSNorm: variance in fp32, normalized value cast back to the input dtype, then times the weight.
- RoPE: HF ``rotate_half`` (half split) convention, rotation computed in fp32 (fp64 for fp64
  inputs) and rounded to the activation dtype.
- Attention: scores ``q @ k^T`` in the activation dtype (fp32 accumulation, as cuBLAS does), softmax
  upcast to fp32, probabilities cast back to the activation dtype, then ``p @ v``. For fp32 inputs
  this is exact fp32 HF math; for fp64 inputs everything stays fp64 (the tests' oracle).

Attention references loop over sequences on the host (``.tolist()``): fine for a CPU fallback with
tiny models and for tests, never used on the GPU hot path.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "rope_cos_sin_ref",
    "apply_rope_ref",
    "append_attention_ref",
    "decode_attention_ref",
    "dream_projection_ref",
    "rmsnorm_ref",
    "silu_and_mul_ref",
    "philox4x32_10_ref",
    "exponential_noise_ref",
    "exponential_sample_ref",
    "quant_linear_ref",
    "group_norm_ref",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every activation dtype, fp64 stays fp64 (oracle mode)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rope_cos_sin_ref(max_pos: int, head_dim: int, theta: float = 10000.0, device=None):
    """RoPE tables as HF LLaMA builds them (before any cast to the activation dtype).

    Returns ``cos, sin``: [max_pos, head_dim // 2] float32, where entry [p, i] is
    cos/sin(p * theta^(-2i/head_dim)).
    """
    assert head_dim % 2 == 0, f"head_dim must be even, got {head_dim}"
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    t = torch.arange(max_pos, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)  # [max_pos, D/2]
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate ``x``: [n, H, D] at positions ``pos``: [n] (HF rotate_half); returns x's dtype."""
    cdt = _compute_dtype(x.dtype)
    half = x.shape[-1] // 2
    c = cos[pos].to(cdt)[:, None, :]  # [n, 1, D/2]
    s = sin[pos].to(cdt)[:, None, :]
    xf = x.to(cdt)
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def _attend_ref(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, offset: int, sm_scale: float):
    """q: [n, Hq, D] (rotated), keys/vals: [offset + n, Hkv, D]; query i sits at position offset + i.

    Returns [n, Hq, D] in q's dtype. Causal with an offset: query i sees keys [0, offset + i].
    """
    n, hq, _ = q.shape
    hkv = keys.shape[1]
    group = hq // hkv
    dt = q.dtype
    sdt = _compute_dtype(dt)
    kk = keys.to(dt).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
    vv = vals.to(dt).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
    qq = q.transpose(0, 1)  # [Hq, n, D]
    scores = torch.matmul(qq, kk.transpose(1, 2)).to(sdt) * sm_scale  # [Hq, n, S]
    s_len = keys.shape[0]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(s_len, device=q.device)[None, :]
    scores = scores.masked_fill(j > offset + i, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(dt)
    return torch.matmul(p, vv).transpose(0, 1)  # [n, Hq, D]


def append_attention_ref(q, k, v, k_cache, v_cache, cu_seqlens_q, cache_lens, slot_ids, cos, sin,
                         max_seqlen_q, sm_scale=None, out=None):
    """Chunked-prefill attention over a static KV cache (oracle and CPU fallback).

    q: [total_q, Hq, D]; k, v: [total_q, Hkv, D] packed new tokens.
    k_cache, v_cache: [num_slots, max_seq, Hkv, D] (mutated: rotated k and raw v written at
    positions [cache_lens[b], cache_lens[b] + q_len_b) of slot slot_ids[b]).
    cu_seqlens_q: [B+1] int32; cache_lens: [B] int32 (tokens cached before this call);
    slot_ids: [B] int32; cos, sin: [max_pos, D/2] float32. max_seqlen_q: host int (unused here).
    Returns out: [total_q, Hq, D] in q's dtype.
    """
    total_q, hq, d = q.shape
    assert k.shape[0] == total_q and v.shape == k.shape, "k/v must be [total_q, Hkv, D] like q"
    assert hq % k.shape[1] == 0, f"Hq={hq} must be a multiple of Hkv={k.shape[1]}"
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    if out is None:
        out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = cache_lens.tolist()
    slots = slot_ids.tolist()
    for b in range(len(lens)):
        s, e, L, slot = cu[b], cu[b + 1], lens[b], slots[b]
        n = e - s
        if n == 0:
            continue
        pos = torch.arange(L, L + n, device=q.device)
        q_rot = apply_rope_ref(q[s:e], cos, sin, pos)
        k_rot = apply_rope_ref(k[s:e], cos, sin, pos)
        k_cache[slot, L:L + n] = k_rot.to(k_cache.dtype)
        v_cache[slot, L:L + n] = v[s:e].to(v_cache.dtype)
        out[s:e] = _attend_ref(q_rot, k_cache[slot, :L + n], v_cache[slot, :L + n], L, sm_scale).to(out.dtype)
    return out


def decode_attention_ref(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, sm_scale=None,
                         num_splits=None, out=None, config=None):
    """One new token per sequence (oracle and CPU fallback).

    q: [B, Hq, D]; k, v: [B, Hkv, D]; the new token of sequence b sits at position cache_lens[b]
    and attends to cache positions [0, cache_lens[b]]. k_cache/v_cache: [num_slots, max_seq, Hkv, D]
    (mutated at that position). cache_lens is NOT incremented. num_splits and config are ignored.
    Returns out: [B, Hq, D] in q's dtype.
    """
    b = q.shape[0]
    cu = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    return append_attention_ref(q, k, v, k_cache, v_cache, cu, cache_lens, slot_ids, cos, sin, 1,
                                sm_scale=sm_scale, out=out)


def rmsnorm_ref(x, weight, eps, residual=None, out=None, residual_out=None):
    """HF LlamaRMSNorm, optionally fused with the residual add.

    x: [..., H]; weight: [H]; residual: like x or None.
    Without residual returns normed (x's dtype). With residual: h = x + residual (in x's dtype) is
    written to residual_out, or in place into residual when residual_out is None, and
    (normed(h), h) is returned.
    """
    h = x
    if residual is not None:
        h = x + residual
        if residual_out is None:
            residual_out = residual
        residual_out.copy_(h)
        h = residual_out
    cdt = _compute_dtype(x.dtype)
    hf = h.to(cdt)
    var = hf.pow(2).mean(-1, keepdim=True)
    normed = (hf * torch.rsqrt(var + eps)).to(x.dtype)
    y = (normed.to(cdt) * weight.to(cdt)).to(x.dtype) if weight.dtype != x.dtype else normed * weight
    if out is None:
        out = y
    else:
        out.copy_(y)
    return out if residual is None else (out, h)


def silu_and_mul_ref(gate_up, out=None):
    """gate_up: [T, 2F] (gate = first F columns, up = last F) -> out: [T, F] = silu(gate) * up."""
    f = gate_up.shape[-1] // 2
    y = torch.nn.functional.silu(gate_up[..., :f]) * gate_up[..., f:]
    if out is None:
        return y
    out.copy_(y)
    return out


def dream_projection_ref(hidden, rows, norm_weight, proj_weight, eps, out=None):
    """Dream-query conditioning: final RMSNorm at the query rows, then the bias-free projector.

    hidden: [T, H] (last decoder layer output before the final norm); rows: [N] int64;
    norm_weight: [H]; proj_weight: [C, H]. Returns out: [N, C] in hidden's dtype (any strides).
    """
    x = hidden.index_select(0, rows.to(torch.long))
    y = rmsnorm_ref(x, norm_weight, eps)
    y = torch.matmul(y, proj_weight.to(y.dtype).t())
    if out is None:
        return y
    out.copy_(y)
    return out


# -- sampling: counter-based Philox noise + the exponential race ---------------------------------
# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; Random123).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key bumps (golden ratio, sqrt(3) - 1)
_U32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit halves of the 64-bit product a * m, for a: int64 in [0, 2^32), m < 2^32.

    int64 cannot hold the full product (up to 2^64), so it is assembled from 16-bit halves; every
    partial sum stays below 2^34.
    """
    ah, al = a >> 16, a & 0xFFFF
    mh, ml = m >> 16, m & 0xFFFF
    t = al * ml
    mid = ah * ml + al * mh + (t >> 16)
    lo = ((mid & 0xFFFF) << 16) | (t & 0xFFFF)
    hi = ah * mh + (mid >> 16)
    return hi, lo


def philox4x32_10_ref(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds on int64 tensors holding uint32 values (broadcastable shapes).

    Counter (c0, c1, c2, c3), key (k0, k1) -> four uint32 outputs as int64 tensors. Bit-exact with
    Random123's philox4x32_R(10, ...) (known-answer vectors in tests/kernels/test_sampling.py).
    """
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(x, dtype=torch.int64) & _U32 for x in (c0, c1, c2, c3, k0, k1))
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W0) & _U32
            k1 = (k1 + PHILOX_W1) & _U32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def exponential_noise_ref(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """The exponential noise q[b, v] = -log(u) of row b: [B] seeds, [B] positions -> [B, V] fp32.

    u = (r0 + 0.5) / 2^32 with r0 the first Philox4x32-10 output for counter (v, position, 0, 0) and
    key (seed low 32 bits, seed high 32 bits): a pure function of (seed, position, v), u in (0, 1).
    The log runs in float64 and is rounded once to float32, so every correct libm (numpy, Sleef,
    CUDA libdevice) gives the same float32 bits except on rounding-boundary cases (~2^-29 of draws).
    """
    seeds = seeds.to(torch.int64).reshape(-1, 1)
    pos = positions.to(torch.int64).reshape(-1, 1)
    v = torch.arange(vocab, dtype=torch.int64, device=seeds.device).reshape(1, -1)
    r0, _, _, _ = philox4x32_10_ref(v, pos, 0, 0, seeds & _U32, (seeds >> 32) & _U32)
    u = (r0.to(torch.float64) + 0.5) * 2.0 ** -32
    return (-torch.log(u)).to(torch.float32)


def exponential_sample_ref(probs, seeds, positions, out=None, noise_out=None):
    """Exponential-race draw (gpt-fast's trick, keyed Philox noise): ids[b] = argmax_v probs[b, v] / q[b, v].

    probs: [B, V] non-negative (need not sum to 1: the argmax is scale-free); seeds: [B] int64
    (63-bit); positions: [B] int32/int64 (the sequence position of the token being drawn).
    With q ~ Exp(1) i.i.d., the argmax is distributed as probs / sum(probs). fp32 IEEE division;
    ties go to the smallest index. out: [B] int64 or None; noise_out: [B, V] fp32 or None (gets q).
    Returns out.
    """
    B, V = probs.shape
    q = exponential_noise_ref(seeds.to(probs.device), positions.to(probs.device), V)
    ids = torch.argmax(probs.float() / q, dim=-1)
    if noise_out is not None:
        noise_out.copy_(q)
    if out is None:
        return ids
    out.copy_(ids)
    return out


def quant_linear_ref(x, qweight, scale, out=None, split_k=None):
    """Weight-only quantized linear (oracle and CPU fallback): (x @ qweight^T) * scale.

    x: [..., K]; qweight: [N, K] int8 or float8_e4m3fn; scale: [N] fp32 (one per output channel).
    The product runs in fp32 (fp64 for fp64 x: the tests' oracle) with the scale applied after the
    K reduction, then one rounding to x's dtype. split_k is ignored. Returns out: [..., N].
    """
    cdt = _compute_dtype(x.dtype)
    y = (torch.matmul(x.to(cdt), qweight.to(cdt).t()) * scale.to(cdt)).to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


def group_norm_ref(x, weight, bias, num_groups: int, eps: float, silu: bool = False, out=None):
    """torch.nn.GroupNorm (optionally followed by SiLU) as diffusers' U-Net and VAE run it.

    x: [N, C, *spatial] (any memory layout); weight, bias: [C]; C divisible by num_groups.
    Computed in x's dtype by torch's own kernels (GroupNorm rounds to x's dtype, then SiLU does):
    the low-precision twin of the tests and the CPU fallback; float64 inputs give the oracle.
    """
    y = torch.nn.functional.group_norm(x, num_groups, weight.to(x.dtype), bias.to(x.dtype), eps)
    if silu:
        y = torch.nn.functional.silu(y)
    if out is None:
        return y
    out.copy_(y)
    return out
