"""Per-call cost of every kernel op at 7B decode and prefill shapes: host work vs GPU work.

Two measurements (``--mode``):

- ``host`` (any machine, no GPU needed): the Python work per call up to the Triton launcher. Every
  kernel's ``run`` is replaced by a no-op stub and the op is called through the public dispatcher
  on real CPU tensors at the 7B shapes, with launch plans made for an H100 (132 SMs): the
  project's own per-call cost (dispatch, checks, plan lookup, argument packing). A second row adds
  Triton's ``JITFunction.run`` (specialization of every argument, cache key, kernel-cache lookup,
  grid) with only the C launcher stubbed, the kernels compiled for sm_90 by the compile-only
  stand-in driver of kernels/targets.py. The C launcher (cuLaunchKernel) and the CUDA device and
  stream queries come on top on a GPU. Needs TRITON_INTERPRET unset (re-runs itself without it).
- ``gpu``: per op, the eager time per call (back-to-back calls, synchronized at the end: the host
  launch path when it bounds) beside the CUDA-graph replay time (GPU only), and the same two for
  the torch equivalent (the reference oracle, SDPA for attention). Issue 11's figures (H100,
  2026-11-23, benchmarks/results/NVIDIA_H100_80GB_HBM3/2026-11-23_17f6485/launch_overhead.json):
  rmsnorm+residual 473 us eager vs 1.59 us in a graph.

    python -m benchmarks.bench_launch_overhead [--mode host|gpu|both] [--quick] [--out DIR]

Target ("host_cost" in dreamllm_fast/bench/targets.py): every op's eager host cost <= 20 us on an
H100 host. Benchmarks only.
"""
import contextlib
import importlib
import os
import subprocess
import sys

import torch

from benchmarks.harness import parser, print_rows, write_results
from dreamllm_fast.bench.harness import eager_and_graph_row, eager_us

H, F, HQ, D, V_ROWS, C, Q = 4096, 11008, 32, 128, 32008, 1024, 64
MAX_SEQ = 2048
KERNEL_MODULES = ("rmsnorm", "swiglu", "append_attention", "decode_attention", "dream_projection")


def _cases(device, dtype, quick):
    """{name: (ours, torch equivalent)} at the engine's 7B shapes; fresh random data."""
    import dreamllm_fast.kernels as K
    from dreamllm_fast.kernels import reference as R

    def rnd(*s, dt=dtype):
        return torch.randn(*s, device=device, dtype=dt)

    cos, sin = K.rope_cos_sin(MAX_SEQ, D, 10000.0, device=device)
    w = rnd(H)
    cases = {}
    for T in (1,) if quick else (1, 770):
        x, r, gu = rnd(T, H), rnd(T, H), rnd(T, 2 * F)
        cases[f"rmsnorm_residual_T{T}"] = (lambda x=x, r=r: K.rmsnorm(x, w, 1e-6, residual=r),
                                           lambda x=x, r=r: R.rmsnorm_ref(x, w, 1e-6, residual=r.clone()))
        cases[f"rmsnorm_T{T}"] = (lambda x=x: K.rmsnorm(x, w, 1e-6), lambda x=x: R.rmsnorm_ref(x, w, 1e-6))
        cases[f"silu_and_mul_T{T}"] = (lambda gu=gu: K.silu_and_mul(gu), lambda gu=gu: R.silu_and_mul_ref(gu))
    for B, ctx in ((1, 1024),) if quick else ((1, 1024), (1, 2047), (16, 1024)):
        qkv = rnd(B, 3 * HQ * D)  # the engine's q/k/v are strided views of one projection
        q, k, v = (qkv[:, i * HQ * D:(i + 1) * HQ * D].view(B, HQ, D) for i in range(3))
        kc, vc = rnd(B + 1, MAX_SEQ, HQ, D), rnd(B + 1, MAX_SEQ, HQ, D)
        lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
        slots = torch.arange(B, dtype=torch.int32, device=device)
        out = torch.empty(B, HQ, D, device=device, dtype=dtype)
        sq, sk, sv = q[:, :, None], kc[:B, :ctx + 1].transpose(1, 2), vc[:B, :ctx + 1].transpose(1, 2)
        cases[f"decode_attention_B{B}_ctx{ctx}"] = (
            lambda a=(q, k, v, kc, vc, lens, slots, cos, sin), out=out: K.decode_attention(*a, out=out),
            lambda sq=sq, sk=sk, sv=sv: torch.nn.functional.scaled_dot_product_attention(sq, sk, sv))
    for T, L in ((770, 0),) if quick else ((770, 0), (64, 1984)):
        qkv = rnd(T, 3 * HQ * D)
        q, k, v = (qkv[:, i * HQ * D:(i + 1) * HQ * D].view(T, HQ, D) for i in range(3))
        kc, vc = rnd(2, MAX_SEQ, HQ, D), rnd(2, MAX_SEQ, HQ, D)
        cu = torch.tensor([0, T], dtype=torch.int32, device=device)
        lens = torch.tensor([L], dtype=torch.int32, device=device)
        slots = torch.zeros(1, dtype=torch.int32, device=device)
        out = torch.empty(T, HQ, D, device=device, dtype=dtype)
        sq, sk, sv = q.transpose(0, 1)[None], kc[:1, :L + T].transpose(1, 2), vc[:1, :L + T].transpose(1, 2)
        mask = (torch.arange(L + T, device=device)[None, :] <= L + torch.arange(T, device=device)[:, None])
        cases[f"append_attention_T{T}_at{L}"] = (
            lambda a=(q, k, v, kc, vc, cu, lens, slots, cos, sin, T), out=out: K.append_attention(*a, out=out),
            lambda sq=sq, sk=sk, sv=sv, m=mask: torch.nn.functional.scaled_dot_product_attention(
                sq, sk, sv, attn_mask=m))
    hid, rows = rnd(770 + Q + 2, H), torch.arange(770 + 1, 770 + 1 + Q, device=device)
    nw, pw = rnd(H), rnd(C, H) / 64
    cases["dream_projection_N64"] = (lambda: K.dream_projection(hid, rows, nw, pw, 1e-6),
                                     lambda: R.dream_projection_ref(hid, rows, nw, pw, 1e-6))
    return cases


@contextlib.contextmanager
def stubbed_kernels():
    """Every kernel's ``run`` replaced by a no-op: the launcher's Python runs, nothing launches."""
    mods = [importlib.import_module(f"dreamllm_fast.kernels.{m}") for m in KERNEL_MODULES]
    from triton.runtime.jit import JITFunction

    kernels = {id(v): v for m in mods for v in vars(m).values() if isinstance(v, JITFunction)}.values()
    for k in kernels:
        k.run = lambda *args, grid, warmup, **kwargs: None
    try:
        yield
    finally:
        for k in kernels:
            del k.run


@contextlib.contextmanager
def stubbed_launches(arch=90):
    """Triton's whole ``JITFunction.run`` (binder, specialization key, kernel cache, grid) with only
    the C launcher stubbed: kernels compile for ``arch`` under the compile-only stand-in driver of
    kernels/targets.py (first call of a shape: a compile, cached by Triton), then every compiled
    kernel's ``run`` is a no-op. Device and stream queries are the stand-in's (no torch calls)."""
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver

    from dreamllm_fast.kernels.targets import StandInDriver

    def init_handles(self):  # what loading the binary sets, minus the driver: a no-op launcher
        if self._run is None:
            self._run, self.function = (lambda *args: None), 0

    previous = getattr(driver, "_active", None)
    driver.set_active(StandInDriver(arch, arch * 10 + 7))
    saved = CompiledKernel.__dict__["_init_handles"]
    CompiledKernel._init_handles = init_handles
    try:
        yield
    finally:
        CompiledKernel._init_handles = saved
        driver.set_active(previous)


def host_rows(quick, triton_run):
    """Per call (us) of each op on CPU tensors: our Python up to the launcher (kernels stubbed), and
    optionally with Triton's ``JITFunction.run`` included (only the C launcher stubbed)."""
    import dreamllm_fast.kernels as K
    from dreamllm_fast.kernels._utils import set_standin_sm_count

    set_standin_sm_count(132)  # launch plans as on an H100
    K.set_backend("triton")
    modes = [("ours, kernels stubbed", stubbed_kernels)]
    if triton_run:
        modes.append(("ours + triton run(), launch stubbed (sm_90)", stubbed_launches))
    rows = []
    try:
        for provider, ctx in modes:
            with ctx():
                for name, (ours, _) in _cases("cpu", torch.bfloat16, quick).items():
                    try:
                        rows.append({"op": name, "provider": provider, "host_us": eager_us(ours, n=2000),
                                     "device": "cpu"})
                    except Exception as e:
                        rows.append({"op": name, "provider": provider, "error": f"{type(e).__name__}: {e}"[:300]})
    finally:
        K.set_backend(None)
        set_standin_sm_count(4)
    return rows


def gpu_rows(quick):
    rows = []
    for dtype in (torch.bfloat16,):
        for name, (ours, ref) in _cases("cuda", dtype, quick).items():
            rows.append(eager_and_graph_row("ours", ours, op=name, dtype=str(dtype)[6:]))
            rows.append(eager_and_graph_row("torch", ref, op=name, dtype=str(dtype)[6:]))
    return rows


def main(argv=None, out_dir=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("host", "gpu", "both"), default=None,
                   help="default: both on a GPU machine, host otherwise")
    p.add_argument("--triton-run", action="store_true",
                   help="host mode: also time Triton's JITFunction.run (compiles for sm_90 first; "
                        "default unless --quick)")
    args = p.parse_args(argv)
    mode = args.mode or ("both" if torch.cuda.is_available() else "host")
    if mode in ("host", "both") and os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # plans as compiled, not interpreted
        return subprocess.run([sys.executable, "-m", "benchmarks.bench_launch_overhead", *(argv or sys.argv[1:])],
                              env=env).returncode
    rows = []
    if mode in ("host", "both"):
        rows += host_rows(args.quick, args.triton_run or not args.quick)
    if mode in ("gpu", "both"):
        if not torch.cuda.is_available():
            print("--mode gpu needs an NVIDIA GPU; none found", file=sys.stderr)
            return 2
        rows += gpu_rows(args.quick)
    if not torch.cuda.is_available():
        print("CPU smoke run: host_us is this machine's Python cost per call with the kernels stubbed, "
              "not a GPU figure")
    print_rows(rows, ["op", "provider", "host_us", "eager_us", "graph_us"])
    return write_results("launch_overhead", rows, out_dir or args.out,
                         extra={"mode": mode, "smoke": not torch.cuda.is_available()})


if __name__ == "__main__":
    rc = main()
    sys.exit(rc if isinstance(rc, int) else 0)
