"""Dream projection (gather + final RMSNorm + 4096 -> 1024 projector): one launch vs torch.

Floor: one read of the 8 MB projector weight (+ 64 rows of hidden); reported as GB/s on those
bytes and as a fraction of the measured copy bandwidth.

    python -m benchmarks.bench_dream_projection [--quick] [--out DIR]
"""
import torch

from benchmarks.harness import Rotator, ceilings, parser, print_rows, require_cuda, timed_row, write_results

H, C, Q = 4096, 1024, 64
TOKENS = [324, 770]


def main(argv=None, out_dir=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    require_cuda()
    from dreamllm_fast.kernels.dream_projection import dream_projection
    from dreamllm_fast.kernels.reference import dream_projection_ref

    ceil = ceilings()
    compiled_ref = torch.compile(dream_projection_ref)
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for T in TOKENS if not args.quick else [770]:
            esz = torch.finfo(dtype).bits // 8
            nbytes = (C * H + Q * H + Q * C) * esz

            def make(i):
                g = torch.Generator(device="cuda").manual_seed(i)
                return dict(hidden=torch.randn(T, H, device="cuda", dtype=dtype, generator=g),
                            rows=torch.arange(T - Q - 1, T - 1, device="cuda"),
                            norm_weight=torch.randn(H, device="cuda", dtype=dtype, generator=g),
                            proj_weight=torch.randn(C, H, device="cuda", dtype=dtype, generator=g) / 64, eps=1e-6)

            rot = Rotator(make, (T * H + C * H) * esz)
            buf = torch.empty(2, Q, C, device="cuda", dtype=dtype)  # [uncond; cond] guidance buffer
            fields = dict(dtype=str(dtype).replace("torch.", ""), tokens=T, bytes=nbytes)
            rs = [timed_row("triton", lambda: dream_projection(**rot.next(), out=buf[1]), **fields),
                  timed_row("torch_ref", lambda: dream_projection_ref(**rot.next(), out=buf[1]), **fields),
                  timed_row("torch_compile", lambda: compiled_ref(**rot.next()), **fields)]
            for r in rs:
                if "ms" in r:
                    r["us"] = r["ms"] * 1e3
                    r["gbps"] = nbytes / (r["ms"] * 1e-3) / 1e9
                    r["frac_copy_bw"] = r["gbps"] / ceil["copy_gbps"]
            rows += rs
    print_rows(rows, ["dtype", "tokens", "provider", "us", "gbps", "frac_copy_bw"])
    return write_results("dream_projection", rows, out_dir or args.out)


if __name__ == "__main__":
    main()
