"""Split-KV decode attention: GB/s on the KV bytes vs SDPA and the reference.

KV bytes = sum_b (cache_lens[b] + 1) * Hkv * D * 2 (k and v) * element size; reported as GB/s and
as a fraction of the device-to-device copy bandwidth measured in the same run. Caches are rotated
over > 4x L2 (one copy per "layer", as in a real decode step). The SDPA baseline reads pre-rotated
caches (no RoPE, no cache write).

    python -m benchmarks.bench_decode_attention [--quick] [--out DIR]
"""
import torch

from benchmarks.harness import Rotator, ceilings, parser, print_rows, require_cuda, timed_row, write_results

H, D = 32, 128
MAX_SEQ = 2048
CONTEXTS = [128, 512, 1024, 2047]
BATCHES = [1, 2]  # batch 2 = [uncond; cond] guidance pair


def make_inputs(B, ctx, dtype, seed=0):
    from dreamllm_fast.kernels.reference import rope_cos_sin_ref

    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, device="cuda", dtype=dtype, generator=g)

    cos, sin = rope_cos_sin_ref(MAX_SEQ, D, 10000.0, device="cuda")
    return dict(q=rnd(B, H, D), k=rnd(B, H, D), v=rnd(B, H, D), k_cache=rnd(B, MAX_SEQ, H, D),
                v_cache=rnd(B, MAX_SEQ, H, D), cache_lens=torch.full((B,), ctx, dtype=torch.int32, device="cuda"),
                slot_ids=torch.arange(B, dtype=torch.int32, device="cuda"), cos=cos, sin=sin)


def main(argv=None, out_dir=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    require_cuda()
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from dreamllm_fast.kernels.decode_attention import decode_attention
    from dreamllm_fast.kernels.reference import decode_attention_ref

    ceil = ceilings()
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for B in BATCHES:
            for ctx in CONTEXTS if not args.quick else [512, 2047]:
                kv_bytes = B * (ctx + 1) * H * D * 2 * torch.finfo(dtype).bits // 8
                rot = Rotator(lambda i: make_inputs(B, ctx, dtype, seed=i), 2 * B * MAX_SEQ * H * D * 2)
                out = torch.empty(B, H, D, device="cuda", dtype=dtype)
                fields = dict(dtype=str(dtype).replace("torch.", ""), batch=B, context=ctx, kv_bytes=kv_bytes)
                rs = [timed_row("triton", lambda: decode_attention(**rot.next(), out=out), **fields)]
                inp = rot.items[0]
                rs.append(timed_row("reference", lambda: decode_attention_ref(**inp), **fields))
                views = [(it["q"][:, :, None], it["k_cache"][:, : ctx + 1].transpose(1, 2),
                          it["v_cache"][:, : ctx + 1].transpose(1, 2)) for it in rot.items]
                vi = iter(range(10 ** 12))
                rs.append(timed_row("sdpa", lambda: sdpa(*views[next(vi) % len(views)]), **fields))
                for r in rs:
                    if "ms" in r:
                        r["gbps"] = kv_bytes / (r["ms"] * 1e-3) / 1e9
                        r["frac_copy_bw"] = r["gbps"] / ceil["copy_gbps"]
                rows += rs
    print_rows(rows, ["dtype", "batch", "context", "provider", "ms", "gbps", "frac_copy_bw"])
    return write_results("decode_attention", rows, out_dir or args.out)


if __name__ == "__main__":
    main()
