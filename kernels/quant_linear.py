"""Weight-only quantized linear: out = (x @ Q^T) * scale, the dequantization fused into the GEMM.

x [M, K] in the activation dtype (bf16/fp16/fp32); Q [N, K] int8 or float8 e4m3 with one fp32
scale per output channel (dreamllm_fast/quant.py). Each weight tile is loaded in its storage type
(1 byte per weight: the point of the op, since batch-1 decode is bound by reading the weights),
converted to the activation dtype in registers (exact: |Q| <= 127 and every e4m3 value fit in
bf16/fp16), and fed to ``tl.dot`` with fp32 accumulation. The scale multiplies each output once,
after the whole K reduction, then one rounding to the output dtype.

Two plans of the same kernel, chosen from the row count (static per call site, so a captured
graph always holds the same one):

- decode (M <= 16: the decode step and the sampled rows' logits): BLOCK_M = 16 rows (tensor-core
  minimum; padding rows are masked and cost FLOPs that decode has to spare), narrow N tiles, and
  split-K when the N tiles alone would leave SMs idle (7B o_proj: N = 4096 -> 64 tiles for 132
  SMs): each split writes an fp32 partial [M, N] and ``_quant_splitk_reduce_kernel`` sums the
  splits in a fixed order (deterministic, no atomics), applies the scale and rounds;
- prefill (M > 16): a dequant-in-kernel tiled GEMM, 64/128-row tiles, no split. Chosen over
  "dequantize, then cuBLAS" because that would write and re-read a bf16 copy of every weight per
  pass (2x + 2x the bytes of the int8 read): on the dream branch (65 rows) and chunk tails the
  pass is still weight-read bound. NOT yet measured against cuBLAS bf16 on a GPU: the issue's
  target (prefill <= 1.1x the bf16 prefill) is for a GPU session to check.

Block sizes are fixed per shape class (decode or not, dtype), not tuned: no GPU was available when
they were set.
The split-K partials are a scratch buffer cached with the launch plan (shared by every layer of the
same shape: launches on one stream run in order), so call once before capturing a graph (the
engine's warm-up does).

fp8 weights need compute capability >= 8.9 (Triton converts e4m3 in hardware there and refuses it
on sm_80); the engine refuses fp8 on such GPUs before loading (dreamllm_fast/quant.py).
"""
import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne
from ._utils import (cdiv, is_interpret, is_tracing, next_pow2, num_sms, plan_cache, prev_pow2,
                     register_triton_op, wrap)

DECODE_MAX_ROWS = 16  # rows served by the skinny (split-K) plan
MAX_SPLITS = 16
WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)


@triton.jit(do_not_specialize=["M"])  # M only masks rows: one binary for every row count
def _quant_linear_kernel(
    # pointers
    x_ptr, w_ptr, s_ptr, out_ptr, part_ptr,
    # sizes
    M, N, K, k_split,
    # strides
    stride_xm, stride_wn, stride_om, stride_on, stride_ps, stride_pm,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DIRECT_OUT: tl.constexpr,
    DOT_PREC: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = pid_k * k_split  # this split's K range: [k_lo, k_lo + k_split), k_split % BLOCK_K == 0
    x_base = x_ptr + offs_m[:, None] * stride_xm
    w_base = w_ptr + offs_n[None, :] * stride_wn  # [BLOCK_K, BLOCK_N] tiles of Q^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_split, BLOCK_K):
        offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_base + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IS_INTERPRET:  # no bf16/int8 dot in the interpreter; the values are exact in fp32
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(x_ptr.dtype.element_ty)  # exact: |Q| <= 127 / e4m3 values fit bf16 and fp16
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
    mask = m_ok[:, None] & n_ok[None, :]
    if DIRECT_OUT:
        s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
        y = acc * s[None, :]  # the per-channel scale, once, after the K reduction
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 cast_rne(y, out_ptr.dtype.element_ty, IS_INTERPRET), mask=mask)
    else:
        tl.store(part_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["num_splits"])
def _quant_splitk_reduce_kernel(
    # pointers
    part_ptr, s_ptr, out_ptr,
    # sizes
    N, num_splits,
    # strides
    stride_ps, stride_pm, stride_om, stride_on,
    # meta
    BLOCK_N: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for sp in range(0, num_splits):  # fixed order: the same bits on every run
        acc += tl.load(part_ptr + sp * stride_ps + row * stride_pm + offs_n, mask=n_ok, other=0.0)
    s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
    tl.store(out_ptr + row * stride_om + offs_n * stride_on,
             cast_rne(acc * s, out_ptr.dtype.element_ty, IS_INTERPRET), mask=n_ok)


def default_num_splits(tiles: int, k_tiles: int, sms: int) -> int:
    """About 4 programs per SM from the output tiles and K splits, a power of two, each split
    keeping >= 2 K tiles for the software pipeline (H100: o_proj 64 tiles -> 8 splits; q|k|v 192
    -> 2; gate|up 344 and the LM head 501 -> 1). Shapes only: graph-safe."""
    split = prev_pow2(max(1, 4 * sms // max(1, tiles)))
    return max(1, min(split, MAX_SPLITS, k_tiles // 2))


def _meta(M: int, N: int, K: int, is_fp32: bool, sms: int, split_k=None):
    """(grid, meta, reduce grid or None, reduce meta, splits, k_split) from shapes and the SM count."""
    interp = is_interpret()
    decode = M <= DECODE_MAX_ROWS
    if interp:  # tiny blocks: the interpreter's cost is per element
        bm, bn, bk, warps, stages = 16, max(16, min(32, next_pow2(N))), 32, 4, 1
        if not decode:
            bm = 32
    elif decode:
        bm, bn, warps = 16, 64, 4
        bk, stages = (64, 3) if is_fp32 else (128, 4)
    elif is_fp32:
        bm, bn, bk, warps, stages = 64, 64, 32, 4, 3
    else:
        bm = 128 if M >= 512 else 64
        bn, bk, warps, stages = 128, 64, (8 if bm == 128 else 4), 3
    tiles, k_tiles = cdiv(M, bm) * cdiv(N, bn), cdiv(K, bk)
    if split_k is None:
        split_k = default_num_splits(tiles, k_tiles, sms) if decode else 1
    assert 1 <= int(split_k) <= MAX_SPLITS, f"split_k must be in [1, {MAX_SPLITS}], got {split_k}"
    k_split = cdiv(k_tiles, int(split_k)) * bk
    splits = cdiv(K, k_split)  # no empty split
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DIRECT_OUT=splits == 1,
                DOT_PREC="ieee" if is_fp32 else "tf32", IS_INTERPRET=interp, num_warps=warps,
                num_stages=stages)
    rbn = min(1024 if not interp else 64, next_pow2(N))
    rmeta = dict(BLOCK_N=rbn, IS_INTERPRET=interp, num_warps=4)
    rgrid = (M, cdiv(N, rbn)) if splits > 1 else None
    return (cdiv(M, bm), cdiv(N, bn), splits), meta, rgrid, rmeta, splits, k_split


def _scratch(M: int, N: int, splits: int, device):
    """fp32 partials [splits, M, N] (None for a single split)."""
    return None if splits == 1 else torch.empty(splits, M, N, dtype=torch.float32, device=device)


_PLANS = plan_cache()  # (M, N, K, x dtype, weight dtype, device, split_k) -> (plan, scratch)


def _launch(kernel, reduce_kernel, x2, qweight, scale, out2, part, plan):
    grid, meta, rgrid, rmeta, splits, k_split = plan
    M, K = x2.shape
    N = qweight.shape[0]
    sp = part.stride() if part is not None else (0, 0, 1)
    if part is None:  # single split: the partial pointer is never dereferenced
        part = out2
    kernel[grid](x2, qweight, scale, out2, part, M, N, K, k_split,
                 x2.stride(0), qweight.stride(0), out2.stride(0), out2.stride(1), sp[0], sp[1], **meta)
    if rgrid is not None:
        reduce_kernel[rgrid](part, scale, out2, N, splits, sp[0], sp[1], out2.stride(0), out2.stride(1), **rmeta)


@register_triton_op("quant_linear", mutates_args=("out",))
def _quant_linear_traced(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, split_k: int,
                         out: torch.Tensor) -> None:
    K, N = x.shape[-1], qweight.shape[0]
    x2, out2 = x.view(-1, K), out.view(-1, N)
    M = x2.shape[0]
    plan = _meta(M, N, K, x.dtype == torch.float32, num_sms(x.device), split_k or None)
    part = _scratch(M, N, plan[4], x.device)  # fresh: never cache traced buffers
    _launch(wrap(_quant_linear_kernel), wrap(_quant_splitk_reduce_kernel), x2, qweight, scale, out2, part, plan)


def quant_linear(x, qweight, scale, out=None, split_k=None):
    """out = (x @ qweight^T) * scale, rounded once to x's dtype.

    x: [..., K] (bf16, fp16 or fp32; flattenable with view(-1, K), last dim contiguous, rows may be
    strided); qweight: [N, K] int8 or float8_e4m3fn, last dim contiguous; scale: [N] fp32;
    out: [..., N] in x's dtype (rows flattenable with view(-1, N)) or None. split_k: force the
    K-split count (tests); default from shapes. Returns out.
    """
    K = x.shape[-1]
    assert qweight.dim() == 2 and qweight.shape[1] == K, \
        f"qweight must be [N, {K}] (x's last dim), got {tuple(qweight.shape)}"
    N = qweight.shape[0]
    assert qweight.dtype in WEIGHT_DTYPES, f"qweight must be int8 or float8_e4m3fn, got {qweight.dtype}"
    assert qweight.stride(-1) == 1 and x.stride(-1) == 1, "the last dims of x and qweight must be contiguous"
    assert scale.shape == (N,) and scale.dtype == torch.float32, f"scale must be [{N}] float32"
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), f"x must be bf16/fp16/fp32, got {x.dtype}"
    dev = x.device
    assert qweight.device == dev and scale.device == dev, "x, qweight and scale must be on one device"
    if out is None:
        out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=dev)
    assert out.shape == (*x.shape[:-1], N) and out.dtype == x.dtype, f"out must be [..., {N}] in x's dtype"
    if x.numel() == 0:
        return out
    if is_tracing(x):
        _quant_linear_traced.op(x, qweight, scale, int(split_k or 0), out)
        return out
    x2 = x if x.dim() == 2 else x.view(-1, K)
    out2 = out if out.dim() == 2 else out.view(-1, N)
    M = x2.shape[0]
    key = (M, N, K, x.dtype, qweight.dtype, dev, split_k)
    entry = _PLANS.get(key)
    if entry is None:
        plan = _meta(M, N, K, x.dtype == torch.float32, num_sms(dev), split_k)
        entry = _PLANS[key] = (plan, _scratch(M, N, plan[4], dev))
    plan, part = entry
    _launch(_quant_linear_kernel, _quant_splitk_reduce_kernel, x2, qweight, scale, out2, part, plan)
    return out
