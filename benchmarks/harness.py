"""Shared benchmark harness: environment record, ceilings, timing, result files.

Every result file carries the GPU name, driver, library versions, git SHA and date, plus the two
ceilings measured on the card in the same process (device-to-device copy bandwidth, bf16 GEMM
rate), so each number is reported as a fraction of what the card can do (performance.md rules).
Benchmarks only: nothing here asserts on timing.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
QUANTILES = [0.5, 0.2, 0.8]  # median, p20, p80
L2_FLUSH_BYTES = 256 << 20  # rotate inputs over > 4x the 50 MB L2 of an H100


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except Exception:
        return None


def git_sha():
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "benchmarks"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return None


def env_info():
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
        "driver": _driver() if cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton") or _version("pytorch-triton"),
        "transformers": _version("transformers"),
        "diffusers": _version("diffusers"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
    }


def gpu_dirname():
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def do_bench(fn):
    """(median, p20, p80) in ms; warm-up excluded (triton.testing.do_bench)."""
    import triton.testing

    return tuple(triton.testing.do_bench(fn, quantiles=QUANTILES))


class Rotator:
    """Cycle over independent copies of the inputs so repeated calls do not hit L2."""

    def __init__(self, make, bytes_per_copy):
        n = max(1, min(64, -(-L2_FLUSH_BYTES // max(1, bytes_per_copy))))
        self.items = [make(i) for i in range(n)]
        self.i = 0

    def next(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return item


_CEILINGS = {}


def ceilings():
    """Measured device-to-device copy bandwidth (GB/s, read + write) and bf16 GEMM TFLOP/s."""
    if _CEILINGS:
        return dict(_CEILINGS)
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))[0]
    _CEILINGS["copy_gbps"] = 2 * n / (ms * 1e-3) / 1e9
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b)[0]
    _CEILINGS["bf16_gemm_tflops"] = 2 * m ** 3 / (ms * 1e-3) / 1e12
    del src, dst, a, b
    torch.cuda.empty_cache()
    return dict(_CEILINGS)


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=None,
                   help="result folder (default: benchmarks/results/<gpu-name>/)")
    p.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    return p


def require_cuda():
    if not torch.cuda.is_available():
        print("benchmarks need an NVIDIA GPU with CUDA; none found", file=sys.stderr)
        sys.exit(2)


def write_results(name, rows, out_dir=None, extra=None):
    """Write rows (list of dicts) with the environment and ceilings to <out_dir>/<name>.json."""
    out_dir = Path(out_dir) if out_dir else REPO / "benchmarks" / "results" / gpu_dirname()
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "env": env_info(), "ceilings": ceilings(), "rows": rows, **(extra or {})}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
    return path


def print_rows(rows, keys):
    print(" | ".join(f"{k:>14}" for k in keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:>14.4g}" if isinstance(v, float) else f"{str(v):>14}")
        print(" | ".join(cells))


def timed_row(provider, fn, **fields):
    """Benchmark fn; returns a row dict with ms quantiles, or the error if the provider fails."""
    try:
        fn()
        torch.cuda.synchronize()
        med, p20, p80 = do_bench(fn)
        return {"provider": provider, "ms": med, "ms_p20": p20, "ms_p80": p80, **fields}
    except Exception as e:  # a missing/unsupported baseline must not kill the run
        return {"provider": provider, "error": f"{type(e).__name__}: {e}"[:300], **fields}


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
