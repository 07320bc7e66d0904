"""Shared benchmark harness: environment record, ceilings, timing, result files.

Installed with the package (``dreamllm-fast bench`` uses it); ``benchmarks/harness.py`` re-exports it
for the per-kernel scripts.

Every result file carries the GPU name, driver, library versions, git SHA and date, plus the two
ceilings measured on the card in the same process (device-to-device copy bandwidth, bf16 GEMM
rate), so each number is reported as a fraction of what the card can do.
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

# The repository root in a source checkout (editable install); else the working directory.
_SRC = Path(__file__).resolve().parents[2]
REPO = _SRC if (_SRC / "benchmarks").is_dir() else Path.cwd()
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
    """HEAD (+ "-dirty" for local kernel/benchmark edits); in a copy without .git (a GPU session's
    working tree) the DREAMLLM_FAST_GIT_SHA variable the session sets, else None."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "benchmarks"], cwd=REPO,
                                   capture_output=True, text=True).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except Exception:
        pass
    return os.environ.get("DREAMLLM_FAST_GIT_SHA") or None


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
    """(median, p20, p80) in ms; warm-up excluded (triton.testing.do_bench on CUDA).

    Off CUDA (a smoke run, never a performance claim) it falls back to wall-clock quantiles.
    """
    if not torch.cuda.is_available():
        return cpu_bench(fn)
    import triton.testing

    return tuple(triton.testing.do_bench(fn, quantiles=QUANTILES))


def cpu_bench(fn, reps: int = 5):
    """(median, p20, p80) in ms of `reps` timed calls after one warm-up call."""
    import time

    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(ts)


# A call this slow is timed over a few reps by CUDA events, not by do_bench's ~100 ms loops plus
# its 5-call estimate: the reference decode of 32 tokens at ctx 1024 took 1.24 s on the H100
# (2026-11-23), an interleaved answer ~15 s; do_bench would spend 7+ calls on each.
HEAVY_CALL_S = 0.2
HEAVY_TOTAL_S = 6.0


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _quantiles(ts):
    q = torch.tensor(ts, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(q.tolist())


def bench_fn(fn):
    """(median, p20, p80) ms of `fn`, its first call excluded as warm-up (and returned timed as
    the 4th value, seconds). Calls under HEAVY_CALL_S go to do_bench; slower ones get
    min(5, HEAVY_TOTAL_S / first call) reps, at least 1."""
    import time

    t0 = time.perf_counter()
    fn()
    _sync()
    first_s = time.perf_counter() - t0
    if first_s < HEAVY_CALL_S:
        return (*do_bench(fn), first_s)
    reps = max(1, min(5, int(HEAVY_TOTAL_S / first_s)))
    return (*bench_with_setup(None, fn, reps), first_s)


def bench_with_setup(setup, fn, reps: int = 5):
    """(median, p20, p80) ms of `fn` alone over `reps` calls, `setup()` run untimed before each.

    For work that must start from a fresh state (a reset static cache re-prefilled), which
    do_bench's back-to-back calls cannot give. CUDA events on a GPU, wall clock otherwise.
    """
    import time

    ts = []
    for _ in range(reps):
        if setup is not None:
            setup()
        _sync()
        if torch.cuda.is_available():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(ts)


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
    """Measured device-to-device copy bandwidth (GB/s, read + write) and bf16 GEMM TFLOP/s.

    On a machine without CUDA: host memcpy bandwidth and fp32 GEMM rate (smoke runs only).
    """
    if _CEILINGS:
        return dict(_CEILINGS)
    if not torch.cuda.is_available():
        src = torch.randint(0, 255, (64 << 20,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        ms = cpu_bench(lambda: dst.copy_(src))[0]
        _CEILINGS["copy_gbps"] = 2 * src.numel() / (ms * 1e-3) / 1e9
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        ms = cpu_bench(lambda: a @ b)[0]
        _CEILINGS["fp32_gemm_tflops_cpu"] = 2 * 1024 ** 3 / (ms * 1e-3) / 1e12
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
    src = dst = a = b = None  # free the 1 GiB buffers before the benchmarks allocate
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
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        med, p20, p80 = do_bench(fn)
        return {"provider": provider, "ms": med, "ms_p20": p20, "ms_p80": p80, **fields}
    except Exception as e:  # a missing/unsupported baseline must not kill the run
        return {"provider": provider, "error": f"{type(e).__name__}: {e}"[:300], **fields}



def eager_us(fn, n: int = 200, warmup: int = 5) -> float:
    """Mean time per call (us) of n back-to-back eager calls, synchronized once at the end: the host
    launch path or the GPU time, whichever bounds the loop. Off CUDA: plain wall time."""
    import time

    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def graph_us(fn, calls: int = 20, replays: int = 10) -> float:
    """GPU time per call (us) inside one CUDA graph of `calls` back-to-back calls, timed with CUDA
    events over `replays` replays after an untimed one. Warm-up (JIT compile, launch plans,
    scratch) runs eagerly on a side stream before the capture, as the engine does."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA-graph timing needs an NVIDIA GPU")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def eager_and_graph_row(provider, fn, n: int = 200, **fields) -> dict:
    """A result row with eager_us and graph_us side by side. Each measurement fails on its own: the
    error goes into eager_error/graph_error and the other figure is kept (off CUDA graph_error
    says so), so one failing provider never ends a benchmark."""
    row = {"provider": provider, **fields}
    try:
        row["eager_us"] = eager_us(fn, n)
    except Exception as e:
        row["eager_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        row["graph_us"] = graph_us(fn)
    except Exception as e:
        row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    return row

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
