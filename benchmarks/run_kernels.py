"""One command for the kernels: GPU tests, then every kernel benchmark, results in one folder.

    python -m benchmarks.run_kernels [--out DIR] [--quick] [--skip-tests] [--only NAME ...] [--timeout-s 600]

Each benchmark runs in its own process (a crash, a CUDA error or its time limit ends only that
benchmark; what it measured is already on disk: every benchmark rewrites its JSON after each case)
and writes <bench>.json with the environment and the ceilings measured in the same run; then
summary.json. On a machine without CUDA it is a smoke run (Triton interpreter, tiny shapes, no
CUDA graphs, tests skipped unless --with-tests): it checks the benchmarks, not the kernels.
Exit status: non-zero if the tests fail or a benchmark crashes or times out.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import REPO, env_info, gpu_dirname

BENCHES = ["bench_launch_overhead", "bench_norms", "bench_dream_projection", "bench_decode_attention",
           "bench_attention", "bench_group_norm"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="result folder (default: benchmarks/results/<gpu-name>/)")
    p.add_argument("--quick", action="store_true", help="fewer benchmark shapes")
    p.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    p.add_argument("--with-tests", action="store_true", help="run the kernel tests on a CPU smoke run too")
    p.add_argument("--only", nargs="*", choices=BENCHES, help="run only these benchmarks")
    p.add_argument("--timeout-s", type=int, default=600, help="time limit per benchmark process")
    p.add_argument("--sweep", action="store_true", help="decode attention: every DecodeConfig candidate")
    args = p.parse_args(argv)
    import torch

    smoke = not torch.cuda.is_available()
    out = (args.out or REPO / "benchmarks" / "results" / gpu_dirname()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary = {"env": env_info(), "smoke": smoke, "tests": None, "benchmarks": {}}
    if smoke:
        print("no CUDA: smoke run (Triton interpreter, tiny shapes); results are not GPU figures")
    status = 0
    if not args.skip_tests and (not smoke or args.with_tests):
        cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-rs", f"--junitxml={out / 'pytest_kernels.xml'}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        (out / "pytest_kernels.log").write_text(proc.stdout + proc.stderr)
        print(proc.stdout[-3000:])
        summary["tests"] = {"returncode": proc.returncode, "tail": proc.stdout.strip().splitlines()[-1:]}
        status |= proc.returncode != 0
    for name in args.only or BENCHES:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out)] + (["--quick"] if args.quick else []) \
            + (["--sweep"] if args.sweep and name == "bench_decode_attention" else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout_s,
                                  env=dict(os.environ))
            ok = proc.returncode == 0
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            ok, log = False, f"timed out after {args.timeout_s} s\n" + str(e.stdout or "")[-3000:]
        (out / f"{name}.log").write_text(log)
        print(f"== {name}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s\n{log[-2500:]}")
        summary["benchmarks"][name] = {"ok": ok, "json": str(out / f"{name.removeprefix('bench_')}.json"),
                                       "seconds": round(time.perf_counter() - t0, 1)}
        status |= not ok
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"results in {out}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
