"""The shared benchmark harness lives in the package (dreamllm_fast.bench.harness) so the installed
``dreamllm-fast bench`` command can use it; the per-kernel scripts import it from here."""
from dreamllm_fast.bench.harness import (QUANTILES, REPO, Rotator, ceilings, cpu_bench, do_bench,  # noqa: F401
                                         env_info, git_sha, gpu_dirname, parser, print_rows,
                                         require_cuda, timed_row, write_results)
