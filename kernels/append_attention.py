"""Append (chunked-prefill) attention over a static KV cache, packed varlen batches.

Two launches:
1. ``_rope_cache_write_kernel``: RoPE on the new keys, rotated k and raw v written into the cache.
2. ``_append_attention_kernel``: flash attention (online softmax, fp32 statistics); q is rotated
   on load; every key and value is read from the cache.

Why not fuse 1 into 2: a query block needs the keys of every earlier row of its chunk, and those rows
belong to other programs (other query blocks, and for GQA other q heads of the same kv head). Triton
has no grid-wide barrier, so a fused kernel would either race on the cache or have to re-rotate the
chunk's keys from ``k`` in every program (a second code path in the hot loop). The separate launch
reads/writes only the new tokens (2 x total_q x Hkv x D elements: ~2 MB for a 258-token chunk at
7B shapes, a few microseconds), and keeps the attention loop a plain cache read.

Causality with an offset: query i of sequence b sits at position cache_lens[b] + i and sees keys
[0, cache_lens[b] + i]. No mask tensor exists; the loop bound stops at the block's last visible key
(fully masked tiles are never visited) and only the last one or two tiles on the diagonal apply the
causal mask (``_attn_inner`` with MASKED=True).
"""
import math

import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne
from ._utils import cdiv, is_interpret, is_tracing, next_pow2, plan_cache, register_triton_op, wrap


@triton.jit
def _rope_cache_write_kernel(
    # pointers
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, cu_ptr, lens_ptr, slots_ptr, cos_ptr, sin_ptr,
    # sizes
    HKV,
    # strides
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcs, stride_kcp, stride_kch, stride_vcs, stride_vcp, stride_vch,
    stride_cos, stride_sin,
    # meta
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    q_start = tl.load(cu_ptr + b).to(tl.int64)
    q_len = tl.load(cu_ptr + b + 1).to(tl.int64) - q_start
    if pid_t * BLOCK_T >= q_len:
        return
    cache_len = tl.load(lens_ptr + b).to(tl.int64)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = (t < q_len)[:, None]
    d = tl.arange(0, HALF)[None, :]
    pos = (cache_len + t)[:, None]  # [BLOCK_T, 1]
    row = (q_start + t)[:, None]
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=mask, other=0.0)
    s = tl.load(sin_ptr + pos * stride_sin + d, mask=mask, other=0.0)
    kc_base = k_cache_ptr + slot * stride_kcs + pos * stride_kcp + d
    vc_base = v_cache_ptr + slot * stride_vcs + pos * stride_vcp + d
    for h in range(0, HKV):
        kp = k_ptr + row * stride_kt + h * stride_kh + d
        k1 = tl.load(kp, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(kp + HALF, mask=mask, other=0.0).to(tl.float32)
        kc = kc_base + h * stride_kch
        tl.store(kc, cast_rne(k1 * c - k2 * s, k_cache_ptr.dtype.element_ty, IS_INTERPRET), mask=mask)
        tl.store(kc + HALF, cast_rne(k2 * c + k1 * s, k_cache_ptr.dtype.element_ty, IS_INTERPRET), mask=mask)
        vp = v_ptr + row * stride_vt + h * stride_vh + d
        vc = vc_base + h * stride_vch
        tl.store(vc, tl.load(vp, mask=mask, other=0.0), mask=mask)
        tl.store(vc + HALF, tl.load(vp + HALF, mask=mask, other=0.0), mask=mask)


@triton.jit
def _attn_inner(acc, m_i, l_i, q1, q2, kc_ptr, vc_ptr, stride_kcp, stride_vcp, qk_scale, pos_m,
                lo, hi, kv_end,
                HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, DOT_PREC: tl.constexpr, IS_INTERPRET: tl.constexpr):
    """Online softmax over key tiles [lo, hi). kc_ptr/vc_ptr point at (slot, pos 0, kv head)."""
    d_half = tl.arange(0, HALF)
    d_full = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kp = kc_ptr + offs_n[None, :].to(tl.int64) * stride_kcp + d_half[:, None]  # [HALF, BLOCK_N]
        vp = vc_ptr + offs_n[:, None].to(tl.int64) * stride_vcp + d_full[None, :]  # [BLOCK_N, D]
        if MASKED:
            n_ok = offs_n < kv_end
            k1 = tl.load(kp, mask=n_ok[None, :], other=0.0)
            k2 = tl.load(kp + HALF, mask=n_ok[None, :], other=0.0)
            v = tl.load(vp, mask=n_ok[:, None], other=0.0)
        else:
            k1 = tl.load(kp)
            k2 = tl.load(kp + HALF)
            v = tl.load(vp)
        if IS_INTERPRET:  # the interpreter cannot do arithmetic on bf16 tiles
            k1 = k1.to(tl.float32)
            k2 = k2.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q1, k1, input_precision=DOT_PREC)
        s = tl.dot(q2, k2, s, input_precision=DOT_PREC)
        s = s * qk_scale  # log2 domain
        if MASKED:
            s = tl.where((offs_n[None, :] <= pos_m[:, None]) & (offs_n[None, :] < kv_end), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _append_attention_kernel(
    # pointers
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_ptr, lens_ptr, slots_ptr, cos_ptr, sin_ptr,
    # sizes
    qk_scale,
    # strides
    stride_qt, stride_qh, stride_kcs, stride_kcp, stride_kch, stride_vcs, stride_vcp, stride_vch,
    stride_ot, stride_oh, stride_cos, stride_sin,
    # meta
    GROUP: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    HEAD_DIM: tl.constexpr = 2 * HALF
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor types Python floats fp64: keep m_i/l_i fp32
    pid_m = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    q_start = tl.load(cu_ptr + b).to(tl.int64)
    q_len = tl.load(cu_ptr + b + 1).to(tl.int64) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    cache_len = tl.load(lens_ptr + b).to(tl.int64)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    h_kv = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = (offs_m < q_len)[:, None]
    pos_m = cache_len + offs_m  # absolute positions of the block's queries
    d = tl.arange(0, HALF)[None, :]
    # q: rotate in fp32, round to the activation dtype (as the reference does), feed the MMA in it.
    qp = q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + d
    q1 = tl.load(qp, mask=m_ok, other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=m_ok, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + pos_m[:, None] * stride_cos + d, mask=m_ok, other=0.0)
    s = tl.load(sin_ptr + pos_m[:, None] * stride_sin + d, mask=m_ok, other=0.0)
    q1r = cast_rne(q1 * c - q2 * s, q_ptr.dtype.element_ty, IS_INTERPRET)
    q2r = cast_rne(q2 * c + q1 * s, q_ptr.dtype.element_ty, IS_INTERPRET)
    if IS_INTERPRET:
        q1r = q1r.to(tl.float32)
        q2r = q2r.to(tl.float32)

    kc_ptr = k_cache_ptr + slot * stride_kcs + h_kv * stride_kch
    vc_ptr = v_cache_ptr + slot * stride_vcs + h_kv * stride_vch
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # keys every row of the block sees: [0, cache_len + first row]; last key any row sees: kv_end - 1
    # loop bounds as int32 (positions < max_seq); pointer math below widens to int64
    kv_end = (cache_len + tl.minimum((pid_m + 1) * BLOCK_M, q_len)).to(tl.int32)
    full_end = (((cache_len + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N).to(tl.int32)
    acc, m_i, l_i = _attn_inner(acc, m_i, l_i, q1r, q2r, kc_ptr, vc_ptr, stride_kcp, stride_vcp, qk_scale,
                                pos_m, 0, full_end, kv_end, HALF, HEAD_DIM, BLOCK_N, False, DOT_PREC,
                                IS_INTERPRET)
    acc, m_i, l_i = _attn_inner(acc, m_i, l_i, q1r, q2r, kc_ptr, vc_ptr, stride_kcp, stride_vcp, qk_scale,
                                pos_m, full_end, kv_end, kv_end, HALF, HEAD_DIM, BLOCK_N, True, DOT_PREC,
                                IS_INTERPRET)
    o = acc / l_i[:, None]
    op = out_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(op, cast_rne(o, out_ptr.dtype.element_ty, IS_INTERPRET), mask=m_ok)


def _check_cache_args(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin):
    """Shape/dtype/layout/device preconditions shared by append and decode (about 3 us here: ints
    and tuples only, ``get_device()`` instead of building torch.device objects)."""
    total, hq, d = q.shape
    hkv = k.shape[1]
    assert d in (64, 128), f"head_dim must be 64 or 128, got {d}"
    assert k.shape == (total, hkv, d) and v.shape == k.shape, f"k/v must be [{total}, Hkv, {d}], got {tuple(k.shape)}/{tuple(v.shape)}"
    assert hq % hkv == 0, f"Hq={hq} must be a multiple of Hkv={hkv}"
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (hkv, d), f"k_cache must be [slots, max_seq, {hkv}, {d}], got {tuple(k_cache.shape)}"
    assert v_cache.shape == k_cache.shape, "v_cache must match k_cache"
    assert k_cache.dtype == v_cache.dtype == k.dtype == v.dtype == q.dtype, "q, k, v and the caches must share one dtype"
    assert q.stride()[-1] == k.stride()[-1] == v.stride()[-1] == k_cache.stride()[-1] == v_cache.stride()[-1] == 1, \
        "q, k, v, k_cache and v_cache must have a contiguous last dim"
    assert cos.shape == sin.shape and cos.shape[-1] == d // 2, f"cos/sin must be [max_pos, {d // 2}]"
    assert cos.dtype == sin.dtype == torch.float32 and cos.stride()[-1] == sin.stride()[-1] == 1, "cos/sin must be fp32, last dim contiguous"
    assert cache_lens.dtype == slot_ids.dtype == torch.int32, "cache_lens and slot_ids must be int32"
    dev = q.get_device()  # -1 on the CPU
    assert (k.get_device() == dev and v.get_device() == dev and k_cache.get_device() == dev
            and v_cache.get_device() == dev and cache_lens.get_device() == dev and slot_ids.get_device() == dev
            and cos.get_device() == dev and sin.get_device() == dev), \
        f"all tensors must be on one device, got " \
        f"{[str(t.device) for t in (q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin)]}"


def _meta(max_seqlen_q: int, B: int, hq: int, hkv: int, d: int, is_fp32: bool):
    """(write grid, write meta, attention grid, attention meta) from shapes only."""
    interp = is_interpret()
    block_t = 16 if interp else 32
    write_meta = dict(HALF=d // 2, BLOCK_T=block_t, IS_INTERPRET=interp, num_warps=4)
    if interp:  # fewer, larger numpy ops: the interpreter's cost is per op, not per element
        block_m, block_n, warps, stages = min(64, max(16, next_pow2(max_seqlen_q))), 64, 4, 1
    elif is_fp32:  # test-only path: ieee fp32 MMA, smaller tiles to fit shared memory
        block_m, block_n, warps, stages = (64 if max_seqlen_q > 32 else 32), 32, 4, 2
    else:  # H100: 128x64 tiles, 8 warps, 3 stages for D=128 (Triton tutorial class of configs)
        block_m = 128 if max_seqlen_q > 64 else max(16, next_pow2(max_seqlen_q))
        block_n = 64
        warps = 8 if (block_m == 128 and d == 128) else 4
        stages = 3
    attn_meta = dict(GROUP=hq // hkv, HALF=d // 2, BLOCK_M=block_m, BLOCK_N=block_n,
                     DOT_PREC="ieee" if is_fp32 else "tf32", IS_INTERPRET=interp, num_warps=warps, num_stages=stages)
    return (cdiv(max_seqlen_q, block_t), B), write_meta, (cdiv(max_seqlen_q, block_m), B, hq), attn_meta


_PLANS = plan_cache()  # (max_seqlen_q, B, Hq, Hkv, D, dtype) -> _meta(...)


def _launch(write_kernel, attn_kernel, q, k, v, k_cache, v_cache, cu_seqlens_q, cache_lens, slot_ids, cos, sin,
            sm_scale, out, plan):
    write_grid, write_meta, attn_grid, attn_meta = plan
    qs, ks, vs, kcs, vcs, outs = q.stride(), k.stride(), v.stride(), k_cache.stride(), v_cache.stride(), out.stride()
    scs, sss = cos.stride()[0], sin.stride()[0]
    write_kernel[write_grid](
        k, v, k_cache, v_cache, cu_seqlens_q, cache_lens, slot_ids, cos, sin,
        k.shape[1],
        ks[0], ks[1], vs[0], vs[1],
        kcs[0], kcs[1], kcs[2], vcs[0], vcs[1], vcs[2],
        scs, sss,
        **write_meta,
    )
    attn_kernel[attn_grid](
        q, k_cache, v_cache, out, cu_seqlens_q, cache_lens, slot_ids, cos, sin,
        sm_scale * 1.4426950408889634,
        qs[0], qs[1], kcs[0], kcs[1], kcs[2], vcs[0], vcs[1], vcs[2],
        outs[0], outs[1], scs, sss,
        **attn_meta,
    )


@register_triton_op("append_attention", mutates_args=("k_cache", "v_cache", "out"))
def _append_attention_traced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor, cache_lens: torch.Tensor,
                             slot_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, max_seqlen_q: int,
                             sm_scale: float, out: torch.Tensor) -> None:
    plan = _meta(max_seqlen_q, cache_lens.shape[0], q.shape[1], k.shape[1], q.shape[2], q.dtype == torch.float32)
    _launch(wrap(_rope_cache_write_kernel), wrap(_append_attention_kernel), q, k, v, k_cache, v_cache,
            cu_seqlens_q, cache_lens, slot_ids, cos, sin, sm_scale, out, plan)


def append_attention(q, k, v, k_cache, v_cache, cu_seqlens_q, cache_lens, slot_ids, cos, sin,
                     max_seqlen_q, sm_scale=None, out=None):
    """Append a packed chunk to the KV cache and attend causally over prefix + chunk.

    q: [total_q, Hq, D]; k, v: [total_q, Hkv, D] (packed, no padding; D in {64, 128}).
    k_cache, v_cache: [num_slots, max_seq, Hkv, D], any strides with a contiguous last dim; rotated k
    and raw v are written at positions [cache_lens[b], cache_lens[b] + q_len_b) of slot slot_ids[b].
    cu_seqlens_q: [B+1] int32; cache_lens: [B] int32 (before this call, not incremented);
    slot_ids: [B] int32; cos, sin: [max_pos, D/2] fp32; max_seqlen_q: host int >= max q_len_b
    (sizes the grid). sm_scale: default 1/sqrt(D). out: [total_q, Hq, D] in q's dtype or None.
    Returns out.
    """
    _check_cache_args(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin)
    total, hq, d = q.shape
    hkv = k.shape[1]
    B = cache_lens.shape[0]
    assert cu_seqlens_q.shape == (B + 1,) and cu_seqlens_q.dtype == torch.int32, f"cu_seqlens_q must be [{B + 1}] int32"
    assert slot_ids.shape == (B,), f"slot_ids must be [{B}]"
    assert isinstance(max_seqlen_q, int) and max_seqlen_q >= 0, "max_seqlen_q must be a host int"
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "out must be like q"
    if total == 0 or B == 0 or max_seqlen_q == 0:
        return out
    if is_tracing(q):
        _append_attention_traced.op(q, k, v, k_cache, v_cache, cu_seqlens_q, cache_lens, slot_ids, cos, sin,
                                    max_seqlen_q, sm_scale, out)
        return out
    key = (max_seqlen_q, B, hq, hkv, d, q.dtype)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _meta(max_seqlen_q, B, hq, hkv, d, q.dtype == torch.float32)
    _launch(_rope_cache_write_kernel, _append_attention_kernel, q, k, v, k_cache, v_cache, cu_seqlens_q,
            cache_lens, slot_ids, cos, sin, sm_scale, out, plan)
    return out
