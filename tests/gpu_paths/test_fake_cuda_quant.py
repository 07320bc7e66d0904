"""The int8 weight-only engine at the released 7B shapes on FAKE CUDA tensors (issue 23).

`python -m dreamllm_fast.devtools.check7b --weights int8 --json --no-plants` (a subprocess, as in
test_fake_cuda.py): the 7B engine in bf16 with every LLaMA linear and the LM head quantized to
int8 at load, on the device; every prefill bucket and decode size captured through the stand-in
backend under `NoHostSync` (quant_linear's launch plan and split-K scratch inside captured steps),
then every stage. The planted-bug checks are the bf16 run's (test_fake_cuda.py): they patch the
same kernels in the same steps.

Memory (measured in this fake run, ctx 2048): LLM 6.40 GiB (int8 linears 6.15 GiB + the bf16
embedding table), CLIP 0.54, U-Net 1.61, VAE 0.16, KV cache 2.05, graph pool 0.11; peak of the LLM
stages 10.89 GiB, peak of the whole pipeline 12.15 GiB at the U-Net step, + 1 GiB assumed for what
is not a tensor = 13.15 GiB against the issue's 13 GiB target: NOT met by this estimate. The U-Net
stage is overstated here (under FakeTensorMode SDPA takes the math path and materializes the
[2, 5, 4096, 4096] attention scores a GPU's flash kernel never holds); `check7b --real --weights
int8` on a GPU gives the measured figure. Cost: ~50 s of CPU (3-4 min wall on the shared machine).
"""
from __future__ import annotations

import pytest
import torch

from fake_cuda_helpers import run_json_report

pytestmark = pytest.mark.skipif(not torch.backends.cuda.is_built(),
                                reason="fake CUDA tensors need torch's CUDA build (a CPU-only wheel has none)")

GiB = 2 ** 30


@pytest.fixture(scope="module")
def report():
    return run_json_report("dreamllm_fast.devtools.check7b", "--no-plants", "--weights", "int8", timeout=900)


def test_int8_engine_runs_every_stage_captured(report):
    s, g = report["shapes"], report["graphs"]
    assert report["config"]["weights"] == "int8"
    assert s["prefill logits"] == [32008] and s["decode logits batch 2"] == [2, 32008]
    assert s["dream condition"] == [64, 1024] and s["image"] == [1, 3, 512, 512]
    assert g["prefill buckets"] == len(report["config"]["prefill_buckets"]) and g["decode graphs"] == 3 * g["decode sizes"]
    assert g["replayed in the stages"] >= 9
    launches = report["launches per step"]["decode batch 1 (logits)"]
    print("launches per int8 decode step:", launches)
    assert launches["aten"] <= 2  # the quantized linears are Triton launches, not aten matmuls


def test_int8_memory(report):
    w = report["weights_bytes"]
    llm = next(v for k, v in w.items() if k.startswith("LLM"))
    # 6.48 G linear weights at 1 byte + scales + the bf16 embedding table (0.24 GiB)
    assert llm < 6.5 * GiB
    assert report["config"]["decode_read_bytes"] < 6.3 * GiB  # what one decode step reads
    stages = report["stages"]
    llm_peak = max(r["peak"] for name, r in stages.items() if not name.startswith(("U-Net", "VAE")))
    est, allowance = report["peak_estimate_bytes"], report["untracked_allowance_bytes"]
    print(f"int8: LLM {llm / GiB:.2f} GiB; peak of the LLM stages {llm_peak / GiB:.2f} GiB; whole "
          f"pipeline {report['peak_tracked_bytes'] / GiB:.2f} GiB + {allowance / GiB:.2f} GiB allowance = "
          f"{est / GiB:.2f} GiB (target {report['bound_bytes'] / GiB:.0f} GiB)")
    assert report["bound_bytes"] == 13 * GiB
    assert llm_peak + allowance < 13 * GiB  # measured 11.89 GiB
    assert est < 20 * GiB  # the bf16 bound; the 13 GiB whole-pipeline target: see the module docstring
