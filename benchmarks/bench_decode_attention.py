"""Split-KV decode attention: GPU time (CUDA graph) and eager time per call, beside SDPA,
FlexAttention and the reference; GB/s on the KV bytes.

KV bytes = sum_b (cache_lens[b] + 1) * Hkv * D * 2 (k and v) * element size, over the GPU time
(graph_us), and as a fraction of the device-to-device copy bandwidth measured in the same run
(target: >= 0.8 at context 2048, dreamllm_fast/bench/targets.py). Caches rotate over > 4x L2
(one copy per layer,
as in a real decode step); the graph captures calls on different copies. SDPA and Flex read
pre-rotated caches (no RoPE, no cache write). ``--sweep`` times every ``DecodeConfig`` candidate:
the numbers a GPU session needs to pick ``DEFAULT_CONFIG``.

    python -m benchmarks.bench_decode_attention [--quick] [--sweep] [--out DIR]
"""
from benchmarks.kernel_common import DEVICE, SMOKE, ResultFile, add_gbps, measure  # noqa: I001 (sets smoke mode)

import torch  # noqa: E402

from benchmarks.harness import Rotator, ceilings, parser  # noqa: E402

H, D, MAX_SEQ = (2, 64, 128) if SMOKE else (32, 128, 2048)
CONTEXTS = [5, 100] if SMOKE else [128, 512, 1024, 2047]
BATCHES = [1, 2] if SMOKE else [1, 2, 16]  # 2 = the [uncond; cond] guidance pair, 16 = largest capture


def make_inputs(B, ctx, dtype, seed=0):
    from dreamllm_fast.kernels.reference import rope_cos_sin_ref

    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, device=DEVICE, dtype=dtype, generator=g)

    cos, sin = rope_cos_sin_ref(MAX_SEQ, D, 10000.0, device=DEVICE)
    return dict(q=rnd(B, H, D), k=rnd(B, H, D), v=rnd(B, H, D), k_cache=rnd(B, MAX_SEQ, H, D),
                v_cache=rnd(B, MAX_SEQ, H, D), cache_lens=torch.full((B,), ctx, dtype=torch.int32, device=DEVICE),
                slot_ids=torch.arange(B, dtype=torch.int32, device=DEVICE), cos=cos, sin=sin)


def bench_case(B, ctx, dtype, configs, copy_gbps):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from dreamllm_fast.kernels.decode_attention import decode_attention
    from dreamllm_fast.kernels.reference import decode_attention_ref

    kv_bytes = B * (ctx + 1) * H * D * 2 * torch.finfo(dtype).bits // 8
    rot = Rotator(lambda i: make_inputs(B, ctx, dtype, seed=i), 2 * B * MAX_SEQ * H * D * 2)
    out = torch.empty(B, H, D, device=DEVICE, dtype=dtype)
    fields = dict(dtype=str(dtype).replace("torch.", ""), batch=B, context=ctx, kv_bytes=kv_bytes)
    rows = []
    for cfg in configs:
        tag = f"{cfg.variant}/{cfg.block_n}/w{cfg.num_warps}/s{cfg.num_stages}"
        name = "triton" if len(configs) == 1 else f"triton[{tag}]"
        rows.append(measure(name, lambda: decode_attention(**rot.next(), out=out, config=cfg), **fields))
    views = [(it["q"][:, :, None], it["k_cache"][:, : ctx + 1].transpose(1, 2),
              it["v_cache"][:, : ctx + 1].transpose(1, 2)) for it in rot.items]
    vi = iter(range(10 ** 12))
    rows.append(measure("sdpa", lambda: sdpa(*views[next(vi) % len(views)]), **fields))
    if SMOKE:
        rows.append({"provider": "flex_attention", "error": "skipped in the CPU smoke run", **fields})
    else:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention)
            rows.append(measure("flex_attention", lambda: flex(*views[next(vi) % len(views)]), **fields))
        except Exception as e:
            rows.append({"provider": "flex_attention", "error": f"{type(e).__name__}: {e}"[:300], **fields})
    inp = rot.items[0]
    rows.append(measure("reference", lambda: decode_attention_ref(**inp), **fields))  # host loop: no graph
    return [add_gbps(r, kv_bytes, copy_gbps) for r in rows]


def main(argv=None, out_dir=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="every DecodeConfig candidate, not only the default")
    args = p.parse_args(argv)
    from dreamllm_fast.kernels.decode_attention import CONFIGS, DEFAULT_CONFIG

    configs = CONFIGS if args.sweep else (DEFAULT_CONFIG,)
    copy_gbps = ceilings()["copy_gbps"]
    res = ResultFile("decode_attention", out_dir or args.out, extra={"configs": [str(c) for c in configs]})
    for dtype in (torch.bfloat16,) if args.quick or SMOKE else (torch.bfloat16, torch.float16):
        for B in BATCHES[:1] if args.quick else BATCHES:
            for ctx in CONTEXTS[-2:] if args.quick else CONTEXTS:
                res.add(bench_case(B, ctx, dtype, configs, copy_gbps))
    return res.finish(["dtype", "batch", "context", "provider", "graph_us", "eager_us", "gbps", "frac_copy_bw"])


if __name__ == "__main__":
    main()
