"""RMSNorm (+ fused residual) and SwiGLU: GPU time (CUDA graph) and eager time per call, beside the
torch reference and torch.compile of it; GB/s against the measured copy bandwidth.

Bytes: rmsnorm+residual reads x, residual and writes h, normed (4 x T x H); SwiGLU reads 2F and
writes F per row. Inputs rotate over > 4x L2.

    python -m benchmarks.bench_norms [--quick] [--out DIR]
"""
from benchmarks.kernel_common import DEVICE, SMOKE, ResultFile, add_gbps, measure  # noqa: I001 (sets smoke mode)

import torch  # noqa: E402

from benchmarks.harness import Rotator, ceilings, parser  # noqa: E402

HIDDEN, FFN = (64, 96) if SMOKE else (4096, 11008)
TOKENS = [1, 5] if SMOKE else [1, 2, 16, 64, 258, 770]


def _compiled(fn):
    """torch.compile of a reference, or a stand-in that raises (an error row) in the smoke run."""
    if SMOKE:
        def skipped(*a, **k):
            raise RuntimeError("torch.compile skipped in the CPU smoke run")
        return skipped
    return torch.compile(fn)


def bench_tokens(T, dtype, copy_gbps, c_rms, c_swi):
    from dreamllm_fast.kernels.reference import rmsnorm_ref, silu_and_mul_ref
    from dreamllm_fast.kernels.rmsnorm import rmsnorm
    from dreamllm_fast.kernels.swiglu import silu_and_mul

    esz = torch.finfo(dtype).bits // 8
    w = torch.randn(HIDDEN, device=DEVICE, dtype=dtype)
    rot = Rotator(lambda i: (torch.randn(T, HIDDEN, device=DEVICE, dtype=dtype),
                             torch.randn(T, HIDDEN, device=DEVICE, dtype=dtype)), 2 * T * HIDDEN * esz)
    out = torch.empty(T, HIDDEN, device=DEVICE, dtype=dtype)
    f = dict(op="rmsnorm_residual", dtype=str(dtype).replace("torch.", ""), tokens=T, bytes=4 * T * HIDDEN * esz)

    def tri():
        x, r = rot.next()
        rmsnorm(x, w, 1e-6, residual=r, out=out)

    def ref():
        x, r = rot.next()
        rmsnorm_ref(x, w, 1e-6, residual=r)

    def comp():
        x, r = rot.next()
        c_rms(x, w, 1e-6, residual=r)

    rows = [measure("triton", tri, **f), measure("torch_ref", ref, **f), measure("torch_compile", comp, **f)]
    rot2 = Rotator(lambda i: torch.randn(T, 2 * FFN, device=DEVICE, dtype=dtype), 2 * T * FFN * esz)
    o2 = torch.empty(T, FFN, device=DEVICE, dtype=dtype)
    f2 = dict(op="silu_and_mul", dtype=str(dtype).replace("torch.", ""), tokens=T, bytes=3 * T * FFN * esz)
    rows += [measure("triton", lambda: silu_and_mul(rot2.next(), out=o2), **f2),
             measure("torch_ref", lambda: silu_and_mul_ref(rot2.next()), **f2),
             measure("torch_compile", lambda: c_swi(rot2.next()), **f2)]
    return [add_gbps(r, r["bytes"], copy_gbps) for r in rows]


def main(argv=None, out_dir=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    from dreamllm_fast.kernels.reference import rmsnorm_ref, silu_and_mul_ref

    copy_gbps = ceilings()["copy_gbps"]
    c_rms, c_swi = _compiled(rmsnorm_ref), _compiled(silu_and_mul_ref)
    res = ResultFile("norms", out_dir or args.out)
    for dtype in (torch.bfloat16,) if args.quick or SMOKE else (torch.bfloat16, torch.float16):
        for T in [TOKENS[0], TOKENS[-1]] if args.quick else TOKENS:
            res.add(bench_tokens(T, dtype, copy_gbps, c_rms, c_swi))
    return res.finish(["op", "dtype", "tokens", "provider", "graph_us", "eager_us", "gbps", "frac_copy_bw"])


if __name__ == "__main__":
    main()
