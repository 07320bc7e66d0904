"""Append (chunked-prefill) attention: GPU time (CUDA graph) and eager time per call, beside SDPA
flash / SDPA + mask / FlexAttention / flash-attn / the reference.

Reports TFLOP/s over the GPU time (causal-with-offset FLOPs: 4 * D * Hq * sum of visible keys per
query) and the fraction of the measured bf16 GEMM rate. Our kernel's time includes RoPE and the
cache write; the SDPA/Flex baselines get pre-rotated, pre-written caches (attention only), so the
ratio favours them; flash_attn_with_kvcache does rope + cache write + attention like ours.

    python -m benchmarks.bench_attention [--quick] [--out DIR]
"""
from benchmarks.kernel_common import DEVICE, SMOKE, ResultFile, add_tflops, measure  # noqa: I001 (sets smoke mode)

import torch  # noqa: E402

from benchmarks.harness import Rotator, ceilings, parser  # noqa: E402

H, D, MAX_SEQ = (2, 64, 128) if SMOKE else (32, 128, 2048)
CASES = {  # name: (q_lens, cache_lens)
    "causal_770": ([770], [0]),
    "causal_2048": ([2048], [0]),
    "image_258@1790": ([258], [1790]),
    "dream_64@1984": ([64], [1984]),
    "guidance_pair_66@700/1200": ([66, 66], [700, 1200]),
    "packed_4_mixed": ([258, 200, 130, 66], [0, 512, 1024, 1500]),
}
QUICK = ("causal_770", "image_258@1790", "guidance_pair_66@700/1200")
if SMOKE:
    CASES = {"causal_20": ([20], [0]), "pair_7@30/50": ([7, 7], [30, 50])}
    QUICK = tuple(CASES)


def make_inputs(q_lens, cache_lens, dtype, seed=0):
    from dreamllm_fast.kernels.reference import rope_cos_sin_ref

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    B, total = len(q_lens), sum(q_lens)

    def rnd(*s):
        return torch.randn(*s, device=DEVICE, dtype=dtype, generator=g)

    cos, sin = rope_cos_sin_ref(MAX_SEQ, D, 10000.0, device=DEVICE)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    return dict(q=rnd(total, H, D), k=rnd(total, H, D), v=rnd(total, H, D),
                k_cache=rnd(B, MAX_SEQ, H, D), v_cache=rnd(B, MAX_SEQ, H, D), cu_seqlens_q=cu,
                cache_lens=torch.tensor(cache_lens, dtype=torch.int32, device=DEVICE),
                slot_ids=torch.arange(B, dtype=torch.int32, device=DEVICE), cos=cos, sin=sin,
                max_seqlen_q=max(q_lens))


def padded_views(inp, q_lens, cache_lens):
    """[B, H, maxq, D] queries and [B, H, maxkv, D] keys/values + bool mask for SDPA/Flex."""
    B, maxq = len(q_lens), max(q_lens)
    maxkv = max(L + n for L, n in zip(cache_lens, q_lens))
    q = torch.zeros(B, maxq, H, D, device=DEVICE, dtype=inp["q"].dtype)
    cu = inp["cu_seqlens_q"].tolist()
    for b in range(B):
        q[b, : q_lens[b]] = inp["q"][cu[b]:cu[b + 1]]
    q = q.transpose(1, 2).contiguous()
    k = inp["k_cache"][:, :maxkv].transpose(1, 2).contiguous()
    v = inp["v_cache"][:, :maxkv].transpose(1, 2).contiguous()
    qi = torch.arange(maxq, device=DEVICE)[:, None]
    kj = torch.arange(maxkv, device=DEVICE)[None, :]
    lens = torch.tensor(cache_lens, device=DEVICE)[:, None, None]
    nq = torch.tensor(q_lens, device=DEVICE)[:, None, None]
    # padded query rows see key 0 so that no row is fully masked (SDPA would return NaN)
    mask = ((kj <= lens + qi) & (qi < nq)) | (kj == 0)
    return q, k, v, mask[:, None], lens.flatten(), nq.flatten()


def flops(q_lens, cache_lens):
    keys = sum(n * L + n * (n + 1) // 2 for n, L in zip(q_lens, cache_lens))
    return 4 * D * H * keys


def bench_case(name, q_lens, cache_lens, dtype, gemm_tflops):
    from dreamllm_fast.kernels.append_attention import append_attention
    from dreamllm_fast.kernels.reference import append_attention_ref

    fl = flops(q_lens, cache_lens)
    per_copy = 2 * len(q_lens) * MAX_SEQ * H * D * 2
    rot = Rotator(lambda i: make_inputs(q_lens, cache_lens, dtype, seed=i), per_copy)
    out = torch.empty_like(rot.items[0]["q"])
    fields = dict(case=name, dtype=str(dtype).replace("torch.", ""), q_lens=q_lens, cache_lens=cache_lens, flops=fl)
    rows = [measure("triton", lambda: append_attention(**rot.next(), out=out), **fields)]
    inp = rot.items[0]
    rows.append(measure("reference", lambda: append_attention_ref(**inp), **fields))
    q, k, v, mask, lens, nq = padded_views(inp, q_lens, cache_lens)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    if len(q_lens) == 1 and cache_lens[0] == 0:
        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa(q, k, v, is_causal=True)
        rows.append(measure("sdpa_flash_causal", flash, **fields))
    rows.append(measure("sdpa_explicit_mask", lambda: sdpa(q, k, v, attn_mask=mask), **fields))
    try:
        if SMOKE:
            raise RuntimeError("skipped in the CPU smoke run")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, qi, kj):
            return ((kj <= lens[b] + qi) & (qi < nq[b])) | (kj == 0)

        bm = create_block_mask(mask_mod, len(q_lens), None, q.shape[2], k.shape[2], device=DEVICE)
        flex = torch.compile(flex_attention)
        rows.append(measure("flex_attention", lambda: flex(q, k, v, block_mask=bm), **fields))
    except Exception as e:
        rows.append({"provider": "flex_attention", "error": f"{type(e).__name__}: {e}"[:300], **fields})
    if len(set(q_lens)) == 1:
        try:
            from flash_attn import flash_attn_with_kvcache  # optional: pip install flash-attn

            B, n = len(q_lens), q_lens[0]
            qf, kf, vf = (inp[x].view(B, n, H, D) for x in ("q", "k", "v"))
            cos_h, sin_h = inp["cos"].to(dtype), inp["sin"].to(dtype)
            rows.append(measure("flash_attn_kvcache", lambda: flash_attn_with_kvcache(
                qf, inp["k_cache"], inp["v_cache"], k=kf, v=vf, rotary_cos=cos_h, rotary_sin=sin_h,
                cache_seqlens=inp["cache_lens"], cache_batch_idx=inp["slot_ids"], causal=True,
                rotary_interleaved=False), **fields))
        except ImportError:
            rows.append({"provider": "flash_attn_kvcache", "error": "flash-attn not installed", **fields})
    rows = [add_tflops(r, fl, gemm_tflops) for r in rows]
    tri = next((r for r in rows if r["provider"] == "triton" and r.get("graph_us")), None)
    for r in rows:
        if tri and r.get("graph_us"):
            r["speedup_vs_this"] = r["graph_us"] / tri["graph_us"]  # > 1: ours is faster (GPU time)
    return rows


def main(argv=None, out_dir=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    ceil = ceilings()
    gemm = ceil.get("bf16_gemm_tflops") or ceil.get("fp32_gemm_tflops_cpu")
    res = ResultFile("attention", out_dir or args.out)
    for dtype in (torch.bfloat16,) if args.quick or SMOKE else (torch.bfloat16, torch.float16):
        for name, (q_lens, cache_lens) in CASES.items():
            if args.quick and name not in QUICK:
                continue
            res.add(bench_case(name, q_lens, cache_lens, dtype, gemm))
    return res.finish(["case", "dtype", "provider", "graph_us", "eager_us", "tflops", "frac_gemm", "speedup_vs_this"])


if __name__ == "__main__":
    main()
