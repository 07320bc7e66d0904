"""Dream projection (gather + final RMSNorm + 4096 -> 1024 projector) in one launch: GPU time (CUDA
graph) and eager time per call, beside the torch reference and torch.compile of it.

Floor: one read of the 8 MB projector weight (+ 64 rows of hidden); reported as GB/s on those
bytes over the GPU time and as a fraction of the measured copy bandwidth.

    python -m benchmarks.bench_dream_projection [--quick] [--out DIR]
"""
from benchmarks.kernel_common import DEVICE, SMOKE, ResultFile, add_gbps, measure  # noqa: I001 (sets smoke mode)

import torch  # noqa: E402

from benchmarks.harness import Rotator, ceilings, parser  # noqa: E402

H, C, Q = (64, 32, 16) if SMOKE else (4096, 1024, 64)
TOKENS = [Q + 2 + 5] if SMOKE else [Q + 2, 2 * (Q + 2), 770 + Q + 2]  # dream span, guidance pair, after a prompt
ROWS = [Q] if SMOKE else [Q, 2 * Q]


def bench_case(T, N, dtype, copy_gbps, compiled_ref):
    from dreamllm_fast.kernels.dream_projection import dream_projection
    from dreamllm_fast.kernels.reference import dream_projection_ref

    esz = torch.finfo(dtype).bits // 8
    nbytes = (C * H + N * H + N * C) * esz

    def make(i):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        return dict(hidden=torch.randn(T, H, device=DEVICE, dtype=dtype, generator=g),
                    rows=torch.arange(T - N - 1, T - 1, device=DEVICE) % T,
                    norm_weight=torch.randn(H, device=DEVICE, dtype=dtype, generator=g),
                    proj_weight=torch.randn(C, H, device=DEVICE, dtype=dtype, generator=g) / 64, eps=1e-6)

    rot = Rotator(make, (T * H + C * H) * esz)
    buf = torch.empty(2, N, C, device=DEVICE, dtype=dtype)  # [uncond; cond] guidance buffer
    fields = dict(dtype=str(dtype).replace("torch.", ""), tokens=T, rows=N, bytes=nbytes)
    rows = [measure("triton", lambda: dream_projection(**rot.next(), out=buf[1]), **fields),
            measure("torch_ref", lambda: dream_projection_ref(**rot.next(), out=buf[1]), **fields),
            measure("torch_compile", lambda: compiled_ref(**rot.next()), **fields)]
    return [add_gbps(r, nbytes, copy_gbps) for r in rows]


def main(argv=None, out_dir=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    from dreamllm_fast.kernels.reference import dream_projection_ref

    copy_gbps = ceilings()["copy_gbps"]
    if SMOKE:
        def compiled_ref(**kw):
            raise RuntimeError("torch.compile skipped in the CPU smoke run")
    else:
        compiled_ref = torch.compile(dream_projection_ref)
    res = ResultFile("dream_projection", out_dir or args.out)
    for dtype in (torch.bfloat16,) if args.quick or SMOKE else (torch.bfloat16, torch.float16):
        for T in TOKENS[:1] if args.quick else TOKENS:
            for N in ROWS:
                if N <= T:
                    res.add(bench_case(T, N, dtype, copy_gbps, compiled_ref))
    return res.finish(["dtype", "tokens", "rows", "provider", "graph_us", "eager_us", "gbps", "frac_copy_bw"])


if __name__ == "__main__":
    main()
