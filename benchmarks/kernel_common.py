"""Shared by the kernel benchmarks: CPU smoke mode, rows with eager and graph time, incremental files.

Import this module before any kernel: on a machine without CUDA it sets TRITON_INTERPRET=1 (the
kernels then run in Triton's interpreter at tiny shapes: a smoke run that exercises every code path
of a benchmark and its result file, never a performance claim).

Each row carries ``eager_us`` (back-to-back eager calls, synchronized at the end: the host launch
path when it bounds) and ``graph_us`` (per call inside a replayed CUDA graph: GPU time only), from
``dreamllm_fast.bench.harness.eager_and_graph_row``; a provider that fails records its error and
the benchmark goes on. Throughput figures (GB/s, TFLOP/s) are computed from ``graph_us``.
"""
import os

import torch

SMOKE = not torch.cuda.is_available()
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cpu" if SMOKE else "cuda"
SMOKE_NOTE = ("CPU smoke run: Triton interpreter at tiny shapes, no CUDA graphs; the timings test the "
              "benchmark, not the kernels")

from dreamllm_fast.bench.harness import eager_and_graph_row, write_results  # noqa: E402


def measure(provider, fn, **fields):
    """One row: eager_us and graph_us of fn (errors recorded per measurement)."""
    return eager_and_graph_row(provider, fn, n=2 if SMOKE else 200, **fields)


def add_gbps(row, nbytes, copy_gbps):
    """GB/s on nbytes over the GPU time (graph_us), and its fraction of the measured copy bandwidth."""
    if row.get("graph_us"):
        row["gbps"] = nbytes / (row["graph_us"] * 1e-6) / 1e9
        row["frac_copy_bw"] = row["gbps"] / copy_gbps
    return row


def add_tflops(row, flops, gemm_tflops):
    """TFLOP/s over the GPU time (graph_us), and its fraction of the measured GEMM rate."""
    if row.get("graph_us"):
        row["tflops"] = flops / (row["graph_us"] * 1e-6) / 1e12
        row["frac_gemm"] = row["tflops"] / gemm_tflops
    return row


class ResultFile:
    """Rows of one benchmark, rewritten to <out_dir>/<name>.json after every case, so a crash or a
    time limit keeps what was measured."""

    def __init__(self, name, out_dir, extra=None):
        self.name, self.out_dir, self.rows = name, out_dir, []
        self.extra = dict(extra or {}, smoke=SMOKE, **({"note": SMOKE_NOTE} if SMOKE else {}))
        if SMOKE:
            print(SMOKE_NOTE)

    def add(self, rows):
        self.rows += rows
        return write_results(self.name, self.rows, self.out_dir, extra=self.extra)

    def finish(self, keys):
        from dreamllm_fast.bench.harness import print_rows

        print_rows(self.rows, keys)
        return write_results(self.name, self.rows, self.out_dir, extra=self.extra)
