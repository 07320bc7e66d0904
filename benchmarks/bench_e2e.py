"""End-to-end DreamLLM-7B numbers (issue 4's set): decode tokens/s at contexts 128 and 1024, time to
first token for 1 image + 512 text tokens, text-to-image with 50 DDPM steps, and an interleaved
answer of 300 tokens + 2 images; the engine (CUDA-graph path, and its eager path on prefill and
decode) vs the reference pipeline vs transformers + StaticCache under torch.compile (in a child
process), with the fraction of the floor.

    python -m benchmarks.bench_e2e [--out DIR] [--dtype bf16|fp16] [--checkpoint DIR]

One implementation serves this script and `dreamllm-fast bench` (dreamllm_fast/bench/stages.py):
this is that command restricted to the end-to-end stages, on random 7B-shape weights by default.
"""
import argparse
import sys

from dreamllm_fast.bench.run import add_bench_arguments, run_bench

E2E_STAGES = ["prefill", "decode", "t2i", "interleaved"]


def main(argv=None) -> int:
    p = add_bench_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.set_defaults(stages=E2E_STAGES)
    return run_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
