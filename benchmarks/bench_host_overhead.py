"""Host overhead of the decode loop: the real pipeline over a backend whose steps cost nothing.

    python -m benchmarks.bench_host_overhead [--device cpu|cuda] [--lengths 250 1000 2000]
                                             [--repeats 7] [--out DIR]

Reports host microseconds per generated token (median, p20, p80 of `--repeats` calls) for chat
and for interleaved generation (3 images), at each length: the whole call per token, the decode
loop's share, and the ratio to the shortest answer (flat in length = ~1 or below). Target (issue
12): <= 50 us per token, 2,000 tokens within 1.2x of 250. The same code is the `host` stage of
`dreamllm-fast bench` (dreamllm_fast/devtools/host_overhead.py). Machines are shared and noisy: compare
medians of several runs, never single calls.
"""
import argparse
import sys

import torch

from benchmarks.harness import print_rows, write_results
from dreamllm_fast.devtools.host_overhead import LENGTHS, measure_host_overhead


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: both when CUDA is present)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, help="result folder (default benchmarks/results/<gpu>/)")
    args = p.parse_args(argv)
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for d in devices:
        rows += measure_host_overhead(d, args.lengths, repeats=args.repeats)
    print_rows(rows, ["device", "job", "tokens", "images", "us_per_token", "us_per_token_p20",
                      "us_per_token_p80", "loop_us_per_token", "vs_shortest"])
    write_results("host_overhead", rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
