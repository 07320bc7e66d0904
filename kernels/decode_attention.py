"""Decode attention (one new token per sequence) with fused RoPE + cache write, split-KV.

Flash-decoding: launch 1 (``_decode_attention_kernel``, grid [B, Hq, NUM_SPLITS]) computes, per
split of the cache, a normalized partial output and its log-sum-exp; launch 2
(``_decode_reduce_kernel``, grid [B, Hq]) merges the splits. At batch 1 with 32 heads, one program
per head would fill only 32 of 132 SMs; splits multiply that.

CUDA-graph safety: the new token's position cache_lens[b] is read on device; the grid, the split
length and the scratch shapes depend only on (B, Hq, D, max_seq) and the SM count, never on the
lengths; no host sync. Splits past the live length do no work and report lse = -inf. Scratch
buffers are cached per shape: call once before capturing (engine warm-up) so the capture reuses them.
They are shared by all layers, which is safe because launches on one stream run in order.

Fused RoPE + cache write (no race): the new key is rotated in registers by every program that needs
it (the split holding position cache_lens[b]); the cache loop reads only positions < cache_lens[b],
so nobody reads the slot that is being written, and exactly one program per (b, kv head) writes it.
Slot ids must be distinct within a batch.
"""
import math

import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne
from ._utils import is_interpret, is_tracing, jit, launch, next_pow2, num_sms, register_triton_op
from .append_attention import _check_cache_args

MAX_SPLITS = 64
BLOCK_N = 64  # cache positions per inner-loop tile


@triton.jit
def _decode_attention_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, lens_ptr, slots_ptr, cos_ptr, sin_ptr,
    o_part_ptr, lse_part_ptr,
    # sizes
    qk_scale, SPLIT_LEN,
    # strides
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_kcs, stride_kcp, stride_kch, stride_vcs, stride_vcp, stride_vch,
    stride_cos, stride_sin, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    # meta
    GROUP: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    HEAD_DIM: tl.constexpr = 2 * HALF
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2).to(tl.int64)
    pos = tl.load(lens_ptr + b).to(tl.int64)  # position of the new token = tokens already cached
    slot = tl.load(slots_ptr + b).to(tl.int64)
    h_kv = h // GROUP
    start = sp * SPLIT_LEN
    has_new = (pos >= start) & (pos < start + SPLIT_LEN)
    d = tl.arange(0, HALF)
    dd = tl.arange(0, HEAD_DIM)

    c = tl.load(cos_ptr + pos * stride_cos + d)
    s = tl.load(sin_ptr + pos * stride_sin + d)
    qp = q_ptr + b * stride_qb + h * stride_qh + d
    q1 = tl.load(qp).to(tl.float32)
    q2 = tl.load(qp + HALF).to(tl.float32)
    # rotated q rounded to the activation dtype (as the reference), then sm_scale * log2(e) folded in
    q1r = cast_rne(q1 * c - q2 * s, q_ptr.dtype.element_ty, IS_INTERPRET).to(tl.float32) * qk_scale
    q2r = cast_rne(q2 * c + q1 * s, q_ptr.dtype.element_ty, IS_INTERPRET).to(tl.float32) * qk_scale

    # cached prefix [start, min(start + SPLIT_LEN, pos)), read from the cache
    kc_ptr = k_cache_ptr + slot * stride_kcs + h_kv * stride_kch
    vc_ptr = v_cache_ptr + slot * stride_vcs + h_kv * stride_vch
    end = tl.minimum(start + SPLIT_LEN, pos).to(tl.int32)  # int32 loop bounds; pointers widen below
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for n0 in range(start.to(tl.int32), end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = offs_n < end
        kp = kc_ptr + offs_n[:, None].to(tl.int64) * stride_kcp + d[None, :]
        k1 = tl.load(kp, mask=ok[:, None], other=0.0).to(tl.float32)
        k2 = tl.load(kp + HALF, mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(vc_ptr + offs_n[:, None].to(tl.int64) * stride_vcp + dd[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        sc = tl.sum(k1 * q1r[None, :], 1) + tl.sum(k2 * q2r[None, :], 1)  # [BLOCK_N], log2 domain
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 0))
        p = tl.exp2(sc - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new

    # the new token: rotate k in registers (rounded like the cache copy), write k/v once
    kp = k_ptr + b * stride_kb + h_kv * stride_kh + d
    k1 = tl.load(kp).to(tl.float32)
    k2 = tl.load(kp + HALF).to(tl.float32)
    k1r = cast_rne(k1 * c - k2 * s, k_cache_ptr.dtype.element_ty, IS_INTERPRET)
    k2r = cast_rne(k2 * c + k1 * s, k_cache_ptr.dtype.element_ty, IS_INTERPRET)
    v_new = tl.load(v_ptr + b * stride_vb + h_kv * stride_vh + dd)
    is_writer = has_new & (h % GROUP == 0)
    w_lim = is_writer.to(tl.int32) * HEAD_DIM  # column bound: 0 for non-writers (a pure-int mask)
    kw = k_cache_ptr + slot * stride_kcs + pos * stride_kcp + h_kv * stride_kch + d
    tl.store(kw, k1r, mask=d < w_lim)
    tl.store(kw + HALF, k2r, mask=d < w_lim)
    tl.store(v_cache_ptr + slot * stride_vcs + pos * stride_vcp + h_kv * stride_vch + dd, v_new,
             mask=dd < w_lim)
    sc_new = tl.sum(k1r.to(tl.float32) * q1r, 0) + tl.sum(k2r.to(tl.float32) * q2r, 0)
    sc_new = tl.where(has_new, sc_new, float("-inf"))
    m_new = tl.maximum(m_i, sc_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty split: keep exp2 NaN-free
    p_new = tl.exp2(sc_new - m_safe)
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + p_new
    acc = acc * alpha + p_new * v_new.to(tl.float32)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe
    lse = tl.where(l_i > 0.0, m_new + tl.log2(l_safe), float("-inf"))  # log2 domain
    tl.store(o_part_ptr + b * stride_ob + h * stride_oh + sp * stride_os + dd, o)
    tl.store(lse_part_ptr + b * stride_lb + h * stride_lh + sp + tl.arange(0, 1), lse)


@triton.jit
def _decode_reduce_kernel(
    # pointers
    o_part_ptr, lse_part_ptr, out_ptr,
    # sizes
    NUM_SPLITS,
    # strides
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    # meta
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sp = tl.arange(0, SPLITS_PAD)
    ok = sp < NUM_SPLITS
    lse = tl.load(lse_part_ptr + b * stride_lb + h * stride_lh + sp, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)  # finite: split 0 always holds position 0
    w = tl.exp2(lse - m)  # empty splits: 0
    dd = tl.arange(0, HEAD_DIM)
    o = tl.load(o_part_ptr + b * stride_ob + h * stride_oh + sp[:, None] * stride_os + dd[None, :],
                mask=ok[:, None], other=0.0)
    res = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_outb + h * stride_outh + dd, cast_rne(res, out_ptr.dtype.element_ty, IS_INTERPRET))


_scratch: dict = {}


def default_num_splits(batch: int, num_heads: int, max_seq: int, device: torch.device) -> int:
    """Enough programs for ~4 waves-worth per SM (H100: 132 SMs), from shapes only (graph-safe)."""
    target = 4 * num_sms(device)
    splits = triton.cdiv(target, max(1, batch * num_heads))
    return max(1, min(splits, MAX_SPLITS, triton.cdiv(max_seq, BLOCK_N)))


def _get_scratch(device, B, hq, splits, d):
    """Split-KV partials, cached per shape so that a captured graph and later replays share them.
    While tracing (fake tensors, torch.compile) they are fresh: fake or traced buffers must never
    enter the cache, nor real ones a trace."""
    key = (device, B, hq, splits, d)
    tracing = is_tracing()
    buf = None if tracing else _scratch.get(key)
    if buf is None:
        buf = (torch.empty(B, hq, splits, d, dtype=torch.float32, device=device),
               torch.empty(B, hq, splits, dtype=torch.float32, device=device))
        if not tracing:
            _scratch[key] = buf
    return buf


@register_triton_op("decode_attention", mutates_args=("k_cache", "v_cache", "o_part", "lse_part", "out"))
def _decode_attention_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, cache_lens: torch.Tensor, slot_ids: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, sm_scale: float, split_len: int,
                             o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor) -> None:
    B, hq, d = q.shape
    hkv = k.shape[1]
    splits = o_part.shape[2]
    interp = is_interpret()
    jit(_decode_attention_kernel)[(B, hq, splits)](
        q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, o_part, lse_part,
        sm_scale * 1.4426950408889634, split_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        cos.stride(0), sin.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        GROUP=hq // hkv, HALF=d // 2, BLOCK_N=BLOCK_N, IS_INTERPRET=interp,
        num_warps=4, num_stages=2,
    )
    jit(_decode_reduce_kernel)[(B, hq)](
        o_part, lse_part, out, splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, SPLITS_PAD=max(2, next_pow2(splits)), IS_INTERPRET=interp, num_warps=4,
    )


def decode_attention(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, sm_scale=None,
                     num_splits=None, out=None):
    """One decode step of attention with fused RoPE and KV-cache write.

    q: [B, Hq, D]; k, v: [B, Hkv, D] (the new token of each sequence; D in {64, 128}).
    k_cache, v_cache: [num_slots, max_seq, Hkv, D], any strides with a contiguous last dim; rotated k
    and raw v are written at position cache_lens[b] of slot slot_ids[b] (distinct slots).
    cache_lens: [B] int32 on device (NOT incremented); slot_ids: [B] int32; cos, sin: [max_pos, D/2]
    fp32. Attends over cache positions [0, cache_lens[b]] inclusive. num_splits: split-KV factor
    (default from (B, Hq, max_seq) and the SM count). out: [B, Hq, D] in q's dtype or None.
    Returns out. Graph-capturable after one warm-up call with the same shapes.
    """
    _check_cache_args(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin)
    B, hq, d = q.shape
    hkv = k.shape[1]
    max_seq = k_cache.shape[1]
    assert cache_lens.shape == (B,) and slot_ids.shape == (B,), f"cache_lens/slot_ids must be [{B}]"
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "out must be like q"
    if B == 0:
        return out
    splits = num_splits or default_num_splits(B, hq, max_seq, q.device)
    split_len = triton.cdiv(triton.cdiv(max_seq, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(max_seq, split_len)  # drop splits that would start past max_seq
    assert 1 <= splits <= 1024, f"num_splits out of range: {splits}"
    o_part, lse_part = _get_scratch(q.device, B, hq, splits, d)
    launch(_decode_attention_launch, q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, sm_scale,
           split_len, o_part, lse_part, out)
    return out
