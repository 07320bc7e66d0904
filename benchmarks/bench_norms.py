"""RMSNorm (+ fused residual) and SwiGLU: GB/s vs the torch reference and torch.compile of it.

Bytes: rmsnorm+residual reads x, residual and writes h, normed (4 x T x H); SwiGLU reads 2F and
writes F per row. Reported against the measured copy bandwidth.

    python -m benchmarks.bench_norms [--quick] [--out DIR]
"""
import torch

from benchmarks.harness import Rotator, ceilings, parser, print_rows, require_cuda, timed_row, write_results

HIDDEN, FFN = 4096, 11008
TOKENS = [1, 2, 64, 258, 770]


def main(argv=None, out_dir=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    require_cuda()
    from dreamllm_fast.kernels.reference import rmsnorm_ref, silu_and_mul_ref
    from dreamllm_fast.kernels.rmsnorm import rmsnorm
    from dreamllm_fast.kernels.swiglu import silu_and_mul

    ceil = ceilings()
    c_rms, c_swi = torch.compile(rmsnorm_ref), torch.compile(silu_and_mul_ref)
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        esz = torch.finfo(dtype).bits // 8
        for T in TOKENS if not args.quick else [1, 770]:
            w = torch.randn(HIDDEN, device="cuda", dtype=dtype)
            rot = Rotator(lambda i: (torch.randn(T, HIDDEN, device="cuda", dtype=dtype),
                                     torch.randn(T, HIDDEN, device="cuda", dtype=dtype)), 2 * T * HIDDEN * esz)
            out = torch.empty(T, HIDDEN, device="cuda", dtype=dtype)
            nbytes = 4 * T * HIDDEN * esz
            f = dict(op="rmsnorm_residual", dtype=str(dtype).replace("torch.", ""), tokens=T, bytes=nbytes)

            def tri():
                x, r = rot.next()
                rmsnorm(x, w, 1e-6, residual=r, out=out)

            def ref():
                x, r = rot.next()
                rmsnorm_ref(x, w, 1e-6, residual=r)

            def comp():
                x, r = rot.next()
                c_rms(x, w, 1e-6, residual=r)

            rs = [timed_row("triton", tri, **f), timed_row("torch_ref", ref, **f), timed_row("torch_compile", comp, **f)]
            rot2 = Rotator(lambda i: torch.randn(T, 2 * FFN, device="cuda", dtype=dtype), 2 * T * FFN * esz)
            o2 = torch.empty(T, FFN, device="cuda", dtype=dtype)
            f2 = dict(op="silu_and_mul", dtype=str(dtype).replace("torch.", ""), tokens=T, bytes=3 * T * FFN * esz)
            rs += [timed_row("triton", lambda: silu_and_mul(rot2.next(), out=o2), **f2),
                   timed_row("torch_ref", lambda: silu_and_mul_ref(rot2.next()), **f2),
                   timed_row("torch_compile", lambda: c_swi(rot2.next()), **f2)]
            for r in rs:
                if "ms" in r:
                    r["us"] = r["ms"] * 1e3
                    r["gbps"] = r["bytes"] / (r["ms"] * 1e-3) / 1e9
                    r["frac_copy_bw"] = r["gbps"] / ceil["copy_gbps"]
            rows += rs
    print_rows(rows, ["op", "dtype", "tokens", "provider", "us", "gbps", "frac_copy_bw"])
    return write_results("norms", rows, out_dir or args.out)


if __name__ == "__main__":
    main()
