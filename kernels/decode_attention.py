"""Decode attention (one new token per sequence) with fused RoPE + cache write, split-KV.

Flash-decoding in two launches: the split kernel computes, per split of the cached keys, a
normalized partial output and its log-sum-exp; ``_decode_reduce_kernel`` (grid [B, Hq]) merges
them. With a single split (large batches) the split kernel writes ``out`` itself and the reduce
launch is skipped. At batch 1 with 32 heads one program per head would fill only 32 of 132 SMs;
splits multiply that.

Split lengths follow the live context, on device: the split count (from shapes) bounds the splits,
and each sequence's split length is ``ceil(cache_lens[b] / splits)`` rounded up to ``BLOCK_N``,
computed in the kernels from ``cache_lens`` (SGLang's decode kernels do the same). So a context of
1024 in a 2048-slot cache keeps every split busy, instead of half of them idle as with splits cut
from ``max_seq`` (the 2026-11-23 design, 11.06 us vs SDPA 8.67 us on an H100 at ctx 1024, batch 1;
benchmarks/results/NVIDIA_H100_80GB_HBM3/2026-11-23_17f6485/launch_overhead.json).
Programs past the live splits return at once.

Two variants of the split kernel (``DecodeConfig.variant``):
- ``"mma"``: one program per (sequence, kv head, split); the q heads of a GQA group are the rows of
  a ``tl.dot`` tile, padded to 16 (MHA: 1 row + 15 zero rows). The padding costs tensor-core FLOPs,
  which decode has to spare; in exchange the key/value tiles stream through shared memory with
  Triton's software pipelining (loads feeding a dot) and the p @ v sum over keys needs no cross-warp
  reduction. FlashAttention's split-KV decode pads M the same way.
- ``"simt"``: one program per (sequence, q head, split); CUDA-core dot products over register
  tiles (the 2026-11-23 kernel's structure).
Both read each cached key and value row once as one contiguous 2*D-byte load (RoPE of q and of the
new key is computed on full rows with a partner-column load, not on two half rows).

CUDA-graph safety: positions come from ``cache_lens`` on device; the grid, the split count and the
scratch shapes depend only on (B, Hq, D, max_seq, dtype, config) and the SM count; no host sync.
Launch plans and scratch buffers are cached per shape key: call once before capturing (engine
warm-up) so the capture reuses them. Scratch is shared by all layers, which is safe because
launches on one stream run in order.

Fused RoPE + cache write (no race): split 0 of each (sequence, kv head) rotates the new key in
registers, writes it and v at position cache_lens[b], and adds its score; the split loops read only
positions < cache_lens[b]. Slot ids must be distinct within a batch.
"""
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne
from ._utils import cdiv, is_interpret, is_tracing, next_pow2, num_sms, plan_cache, prev_pow2, register_triton_op, wrap
from .append_attention import _check_cache_args

MAX_SPLITS = 64  # the reduce holds [next_pow2(splits), D] fp32 partials in registers


@dataclass(frozen=True)
class DecodeConfig:
    """One launch configuration of the split kernel (see the module docstring for the variants)."""

    variant: str = "mma"  # "mma" | "simt"
    block_n: int = 64  # cached positions per loop tile
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        assert self.variant in ("mma", "simt"), f"variant must be 'mma' or 'simt', got {self.variant!r}"
        assert self.block_n in (16, 32, 64, 128), f"block_n must be 16, 32, 64 or 128, got {self.block_n}"


DEFAULT_CONFIG = DecodeConfig()
# The small deterministic set a GPU session sweeps (benchmarks/bench_decode_attention.py --sweep)
# and the compile checks cover (kernels/targets.py). Not measured on a GPU yet; the default is
# the one whose shared memory (2 stages x 32 KB of bf16 K+V tiles) leaves room for 3 programs/SM.
CONFIGS = (
    DEFAULT_CONFIG,
    DecodeConfig("mma", 64, 4, 3),
    DecodeConfig("mma", 32, 4, 3),
    DecodeConfig("mma", 128, 8, 2),
    DecodeConfig("simt", 64, 4, 1),
)


@triton.jit
def _split_bounds(n_keys, num_splits, BLOCK_N: tl.constexpr):
    """(split length, live splits) for n_keys cached keys: the split length is a multiple of
    BLOCK_N, at least one tile; split 0 is always live (it holds the new token)."""
    per = (n_keys + num_splits - 1) // num_splits
    split_len = tl.maximum((per + BLOCK_N - 1) // BLOCK_N, 1) * BLOCK_N
    n_live = tl.maximum((n_keys + split_len - 1) // split_len, 1)
    return split_len, n_live


@triton.jit
def _rope_rows(ptr, row_off, row_ok, cos_ptr, sin_ptr, HALF: tl.constexpr):
    """Rows ``ptr + row_off[r] + [0, 2*HALF)`` rotated by HF rotate_half, fp32 [R, 2*HALF].

    cos_ptr/sin_ptr point at the position's table row. Column d pairs with d +- HALF:
    out[d] = x[d] * cos[d % HALF] + x[partner] * (-sin if d < HALF else +sin).
    """
    dd = tl.arange(0, 2 * HALF)
    partner = (dd + HALF) % (2 * HALF)
    c = tl.load(cos_ptr + dd % HALF)
    s = tl.load(sin_ptr + dd % HALF)
    s = tl.where(dd < HALF, -s, s)
    x = tl.load(ptr + row_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    xp = tl.load(ptr + row_off[:, None] + partner[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    return x * c[None, :] + xp * s[None, :]


@triton.jit(do_not_specialize=["num_splits"])  # one binary for every split count
def _decode_mma_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, lens_ptr, slots_ptr, cos_ptr, sin_ptr,
    o_part_ptr, lse_part_ptr, out_ptr,
    # sizes
    qk_scale, num_splits,
    # strides
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_kcs, stride_kcp, stride_kch, stride_vcs, stride_vcp, stride_vch,
    stride_cos, stride_sin, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    # meta
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT_OUT: tl.constexpr, DOT_PREC: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    HEAD_DIM: tl.constexpr = 2 * HALF
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor types Python floats fp64: keep m_i/l_i fp32
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    pos = tl.load(lens_ptr + b)  # int32: keys already cached = position of the new token
    split_len, n_live = _split_bounds(pos, num_splits, BLOCK_N)
    if sp >= n_live:
        return
    pos64 = pos.to(tl.int64)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    rows = tl.arange(0, BLOCK_H)
    row_ok = rows < GROUP
    heads = hk * GROUP + rows
    dd = tl.arange(0, HEAD_DIM)
    dtype = q_ptr.dtype.element_ty
    cos_row = cos_ptr + pos64 * stride_cos
    sin_row = sin_ptr + pos64 * stride_sin
    # rotated q rounded to the activation dtype (as the reference), fed to the MMA in it
    q = cast_rne(_rope_rows(q_ptr + b * stride_qb, heads * stride_qh, row_ok, cos_row, sin_row, HALF),
                 dtype, IS_INTERPRET)
    if IS_INTERPRET:  # the interpreter cannot do arithmetic on bf16 tiles
        q = q.to(tl.float32)

    kc = k_cache_ptr + slot * stride_kcs + hk * stride_kch
    vc = v_cache_ptr + slot * stride_vcs + hk * stride_vch
    start = sp * split_len
    end = tl.minimum(start + split_len, pos)  # int32 loop bounds; pointer math widens below
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = offs_n < end
        kt = tl.load(kc + offs_n[None, :].to(tl.int64) * stride_kcp + dd[:, None], mask=ok[None, :], other=0.0)
        v = tl.load(vc + offs_n[:, None].to(tl.int64) * stride_vcp + dd[None, :], mask=ok[:, None], other=0.0)
        if IS_INTERPRET:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # [BLOCK_H, BLOCK_N], log2 domain
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    if sp == 0:  # the new token: one program per (sequence, kv head) rotates, writes and scores it
        zero = tl.zeros([1], tl.int64)
        kn = cast_rne(_rope_rows(k_ptr + b * stride_kb + hk * stride_kh, zero, zero == 0, cos_row, sin_row, HALF),
                      k_cache_ptr.dtype.element_ty, IS_INTERPRET)  # [1, D], rounded like the cache copy
        vn = tl.load(v_ptr + b * stride_vb + hk * stride_vh + dd[None, :])  # [1, D]
        tl.store(kc + pos64 * stride_kcp + dd[None, :], kn)
        tl.store(vc + pos64 * stride_vcp + dd[None, :], vn)
        s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32), 1) * qk_scale  # [BLOCK_H]
        m_new = tl.maximum(m_i, s_new)
        p_new = cast_rne(tl.exp2(s_new - m_new), dtype, IS_INTERPRET).to(tl.float32)  # p in v's dtype
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(s_new - m_new)
        acc = acc * alpha[:, None] + p_new[:, None] * vn.to(tl.float32)
        m_i = m_new

    o = acc / l_i[:, None]
    if DIRECT_OUT:  # a single split, no reduce launch: normalize and round here
        tl.store(out_ptr + b * stride_outb + heads[:, None] * stride_outh + dd[None, :],
                 cast_rne(o, out_ptr.dtype.element_ty, IS_INTERPRET), mask=row_ok[:, None])
    else:
        tl.store(o_part_ptr + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os + dd[None, :], o,
                 mask=row_ok[:, None])
        tl.store(lse_part_ptr + b * stride_lb + heads * stride_lh + sp, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])  # one binary for every split count
def _decode_simt_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, lens_ptr, slots_ptr, cos_ptr, sin_ptr,
    o_part_ptr, lse_part_ptr, out_ptr,
    # sizes
    qk_scale, num_splits,
    # strides
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_kcs, stride_kcp, stride_kch, stride_vcs, stride_vcp, stride_vch,
    stride_cos, stride_sin, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    # meta
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT_OUT: tl.constexpr, DOT_PREC: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    HEAD_DIM: tl.constexpr = 2 * HALF
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor types Python floats fp64: keep m_i/l_i fp32
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    pos = tl.load(lens_ptr + b)
    split_len, n_live = _split_bounds(pos, num_splits, BLOCK_N)
    if sp >= n_live:
        return
    pos64 = pos.to(tl.int64)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    h_kv = h // GROUP
    dd = tl.arange(0, HEAD_DIM)
    zero = tl.zeros([1], tl.int64)
    dtype = q_ptr.dtype.element_ty
    cos_row = cos_ptr + pos64 * stride_cos
    sin_row = sin_ptr + pos64 * stride_sin
    # rotated q rounded to the activation dtype (as the reference), then the scale folded in: [1, D]
    q = cast_rne(_rope_rows(q_ptr + b * stride_qb + h * stride_qh, zero, zero == 0, cos_row, sin_row, HALF),
                 dtype, IS_INTERPRET).to(tl.float32) * qk_scale

    kc = k_cache_ptr + slot * stride_kcs + h_kv * stride_kch
    vc = v_cache_ptr + slot * stride_vcs + h_kv * stride_vch
    start = sp * split_len
    end = tl.minimum(start + split_len, pos)
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([1, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = offs_n < end
        k = tl.load(kc + offs_n[:, None].to(tl.int64) * stride_kcp + dd[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(vc + offs_n[:, None].to(tl.int64) * stride_vcp + dd[None, :], mask=ok[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q, 1)  # [BLOCK_N], log2 domain
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha[:, None] + tl.sum(p[:, None] * v.to(tl.float32), 0)[None, :]
        m_i = m_new

    if sp == 0:  # the new token: every q head of the group scores it, the group's first writes it
        kn = cast_rne(_rope_rows(k_ptr + b * stride_kb + h_kv * stride_kh, zero, zero == 0, cos_row, sin_row, HALF),
                      k_cache_ptr.dtype.element_ty, IS_INTERPRET)  # [1, D]
        vn = tl.load(v_ptr + b * stride_vb + h_kv * stride_vh + dd[None, :])
        w_lim = (h % GROUP == 0).to(tl.int32) * HEAD_DIM  # column bound: 0 for non-writers
        tl.store(kc + pos64 * stride_kcp + dd[None, :], kn, mask=dd[None, :] < w_lim)
        tl.store(vc + pos64 * stride_vcp + dd[None, :], vn, mask=dd[None, :] < w_lim)
        s_new = tl.sum(kn.to(tl.float32) * q, 1)  # [1]
        m_new = tl.maximum(m_i, s_new)
        p_new = tl.exp2(s_new - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * vn.to(tl.float32)
        m_i = m_new

    o = acc / l_i[:, None]  # [1, D]
    if DIRECT_OUT:
        tl.store(out_ptr + b * stride_outb + h * stride_outh + dd[None, :],
                 cast_rne(o, out_ptr.dtype.element_ty, IS_INTERPRET))
    else:
        tl.store(o_part_ptr + b * stride_ob + h * stride_oh + sp * stride_os + dd[None, :], o)
        tl.store(lse_part_ptr + b * stride_lb + h * stride_lh + sp + zero, m_i + tl.log2(l_i))


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    # pointers
    o_part_ptr, lse_part_ptr, lens_ptr, out_ptr,
    # sizes
    num_splits,
    # strides
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    # meta
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    _, n_live = _split_bounds(tl.load(lens_ptr + b), num_splits, BLOCK_N)  # same rule as the split kernel
    sp = tl.arange(0, SPLITS_PAD)
    ok = sp < n_live  # dead splits wrote nothing this call: never read them
    lse = tl.load(lse_part_ptr + b * stride_lb + h * stride_lh + sp, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)  # finite: split 0 is always live
    w = tl.exp2(lse - m)
    dd = tl.arange(0, HEAD_DIM)
    o = tl.load(o_part_ptr + b * stride_ob + h * stride_oh + sp[:, None] * stride_os + dd[None, :],
                mask=ok[:, None], other=0.0)
    res = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_outb + h * stride_outh + dd, cast_rne(res, out_ptr.dtype.element_ty, IS_INTERPRET))


def default_num_splits(batch: int, grid_heads: int, max_seq: int, sms: int, block_n: int = 64) -> int:
    """About 4 programs per SM (H100: 132 SMs -> 16 splits at batch 1 x 32 heads, 1 at batch 16),
    a power of two, from shapes only (graph-safe); never more splits than tiles in max_seq."""
    splits = prev_pow2(max(1, 4 * sms // max(1, batch * grid_heads)))
    return max(1, min(splits, MAX_SPLITS, cdiv(max_seq, block_n)))


def _meta(B, hq, hkv, d, max_seq, is_fp32, sms, num_splits, config):
    """(split kernel, split grid, split meta, reduce grid or None, reduce meta, splits) from shapes."""
    cfg = config or DEFAULT_CONFIG
    interp = is_interpret()
    mma = cfg.variant == "mma"
    grid_heads = hkv if mma else hq
    splits = num_splits or default_num_splits(B, grid_heads, max_seq, sms, cfg.block_n)
    splits = min(int(splits), cdiv(max_seq, cfg.block_n))  # more could never be live
    assert 1 <= splits <= MAX_SPLITS, f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}"
    meta = dict(GROUP=hq // hkv, BLOCK_H=max(16, next_pow2(hq // hkv)) if mma else 1, HALF=d // 2,
                BLOCK_N=cfg.block_n, DIRECT_OUT=splits == 1, DOT_PREC="ieee" if is_fp32 else "tf32",
                IS_INTERPRET=interp, num_warps=cfg.num_warps, num_stages=1 if interp else cfg.num_stages)
    # two pad sizes (16 covers every 7B call site on an H100) so one reduce binary serves them all
    rmeta = dict(HEAD_DIM=d, SPLITS_PAD=16 if splits <= 16 else MAX_SPLITS, BLOCK_N=cfg.block_n,
                 IS_INTERPRET=interp, num_warps=4)
    kernel = _decode_mma_kernel if mma else _decode_simt_kernel
    return kernel, (B, grid_heads, splits), meta, ((B, hq) if splits > 1 else None), rmeta, splits


def _scratch(B, hq, d, splits, device):
    """Split partials (o: [B, Hq, S, D] fp32, lse: [B, Hq, S] fp32) as views of buffers whose split
    dim is padded to a multiple of 16: every stride is then divisible by 16, so all split counts
    share one compiled specialization. None for a single split."""
    if splits == 1:
        return None, None
    pad = cdiv(splits, 16) * 16
    return (torch.empty(B, hq, pad, d, dtype=torch.float32, device=device)[:, :, :splits],
            torch.empty(B, hq, pad, dtype=torch.float32, device=device)[:, :, :splits])


_PLANS = plan_cache()  # (B, Hq, Hkv, D, max_seq, dtype, device, num_splits, config) -> plan + scratch


def _launch(kernel, reduce_kernel, q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, sm_scale,
            o_part, lse_part, out, plan):
    _, grid, meta, rgrid, rmeta, splits = plan
    if o_part is None:  # single split: the partial pointers are never dereferenced
        o_part, lse_part, so, sl = out, out, (0, 0, 0), (0, 0)
    else:
        so, sl = o_part.stride(), lse_part.stride()
    qs, ks, vs, kcs, vcs, outs = q.stride(), k.stride(), v.stride(), k_cache.stride(), v_cache.stride(), out.stride()
    kernel[grid](
        q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, o_part, lse_part, out,
        sm_scale * 1.4426950408889634, splits,
        qs[0], qs[1], ks[0], ks[1], vs[0], vs[1],
        kcs[0], kcs[1], kcs[2], vcs[0], vcs[1], vcs[2], cos.stride()[0], sin.stride()[0],
        so[0], so[1], so[2], sl[0], sl[1], outs[0], outs[1],
        **meta,
    )
    if rgrid is not None:
        reduce_kernel[rgrid](o_part, lse_part, cache_lens, out, splits, so[0], so[1], so[2], sl[0], sl[1],
                             outs[0], outs[1], **rmeta)


@register_triton_op("decode_attention", mutates_args=("k_cache", "v_cache", "out"))
def _decode_attention_traced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, cache_lens: torch.Tensor, slot_ids: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, sm_scale: float, num_splits: int,
                             variant: str, block_n: int, num_warps: int, num_stages: int,
                             out: torch.Tensor) -> None:
    B, hq, d = q.shape
    cfg = DecodeConfig(variant, block_n, num_warps, num_stages)
    plan = _meta(B, hq, k.shape[1], d, k_cache.shape[1], q.dtype == torch.float32, num_sms(q.device),
                 num_splits, cfg)
    o_part, lse_part = _scratch(B, hq, d, plan[5], q.device)  # fresh: never cache traced buffers
    _launch(wrap(plan[0]), wrap(_decode_reduce_kernel), q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin,
            sm_scale, o_part, lse_part, out, plan)


def decode_attention(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, sm_scale=None,
                     num_splits=None, out=None, config=None):
    """One decode step of attention with fused RoPE and KV-cache write.

    q: [B, Hq, D]; k, v: [B, Hkv, D] (the new token of each sequence; D in {64, 128}).
    k_cache, v_cache: [num_slots, max_seq, Hkv, D], any strides with a contiguous last dim; rotated k
    and raw v are written at position cache_lens[b] of slot slot_ids[b] (distinct slots).
    cache_lens: [B] int32 on device (NOT incremented); slot_ids: [B] int32; cos, sin: [max_pos, D/2]
    fp32. Attends over cache positions [0, cache_lens[b]] inclusive. num_splits: upper bound of the
    split-KV factor (default from (B, heads, max_seq) and the SM count). config: a `DecodeConfig`
    (default `DEFAULT_CONFIG`). out: [B, Hq, D] in q's dtype or None.
    Returns out. Graph-capturable after one warm-up call with the same shapes.
    """
    _check_cache_args(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin)
    B, hq, d = q.shape
    assert cache_lens.shape == (B,) and slot_ids.shape == (B,), f"cache_lens/slot_ids must be [{B}]"
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride()[-1] == 1, "out must be like q"
    if B == 0:
        return out
    if is_tracing(q):
        cfg = config or DEFAULT_CONFIG
        _decode_attention_traced.op(q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, sm_scale,
                                    int(num_splits or 0), cfg.variant, cfg.block_n, cfg.num_warps, cfg.num_stages,
                                    out)
        return out
    dev = q.device
    key = (B, hq, k.shape[1], d, k_cache.shape[1], q.dtype, dev, num_splits, config)
    entry = _PLANS.get(key)
    if entry is None:
        plan = _meta(B, hq, k.shape[1], d, k_cache.shape[1], q.dtype == torch.float32, num_sms(dev), num_splits,
                     config)
        entry = _PLANS[key] = (plan, *_scratch(B, hq, d, plan[5], dev))
    plan, o_part, lse_part = entry
    _launch(plan[0], _decode_reduce_kernel, q, k, v, k_cache, v_cache, cache_lens, slot_ids, cos, sin, sm_scale,
            o_part, lse_part, out, plan)
    return out
