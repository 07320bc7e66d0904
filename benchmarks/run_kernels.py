"""One command for the GPU session: kernel tests, then every kernel benchmark, results in one folder.

    python -m benchmarks.run_kernels --out benchmarks/results/<gpu>/   [--quick] [--skip-tests]

Writes pytest_kernels.log / pytest_kernels.xml (junit) and <bench>.json files (each with the
environment and the measured ceilings), plus summary.json. Exit status: non-zero if the tests fail
or a benchmark crashes.
"""
import argparse
import json
import subprocess
import sys
import traceback
from pathlib import Path

from benchmarks.harness import REPO, env_info, gpu_dirname

BENCHES = ["bench_norms", "bench_dream_projection", "bench_decode_attention", "bench_attention"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="result folder (default: benchmarks/results/<gpu-name>/)")
    p.add_argument("--quick", action="store_true", help="fewer benchmark shapes")
    p.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    p.add_argument("--only", nargs="*", choices=BENCHES, help="run only these benchmarks")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("run_kernels needs an NVIDIA GPU with CUDA; none found", file=sys.stderr)
        return 2
    out = args.out or REPO / "benchmarks" / "results" / gpu_dirname()
    out.mkdir(parents=True, exist_ok=True)
    summary = {"env": env_info(), "tests": None, "benchmarks": {}}
    status = 0
    if not args.skip_tests:
        cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-rs", f"--junitxml={out / 'pytest_kernels.xml'}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        (out / "pytest_kernels.log").write_text(proc.stdout + proc.stderr)
        print(proc.stdout[-3000:])
        summary["tests"] = {"returncode": proc.returncode, "tail": proc.stdout.strip().splitlines()[-1:]}
        status |= proc.returncode != 0
    for name in args.only or BENCHES:
        mod = __import__(f"benchmarks.{name}", fromlist=["main"])
        try:
            path = mod.main(["--quick"] if args.quick else [], out_dir=out)
            summary["benchmarks"][name] = str(path)
        except Exception:
            summary["benchmarks"][name] = "FAILED: " + traceback.format_exc()[-2000:]
            print(summary["benchmarks"][name], file=sys.stderr)
            status = 1
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"results in {out}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
