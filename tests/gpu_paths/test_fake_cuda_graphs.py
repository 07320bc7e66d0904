"""The `graphs` backend's whole denoising step at 512x512 on FAKE CUDA tensors, every CI run.

`python -m dreamllm_fast.export.check_graphs --json` (a subprocess: Triton must run compiled, not
in the interpreter this suite enables) builds the SD-2.1 U-Net and VAE in fp16 on device "cuda"
under FakeTensorMode, prepares them as the backend does (fused GroupNorm swapped in), captures the
whole CFG + DDPM step for the 1- and 2-image buckets and the VAE decode through the stand-in graph
backend with `NoHostSync` around every captured and replayed run. It caught advanced indexing in
the step (aten.index.Tensor, flagged data-dependent) before any GPU saw it. Measured on this
2-core CPU: 23 s of CPU time (55 s wall on the shared machine).
"""
from __future__ import annotations

import json

import pytest
import torch

from fake_cuda_helpers import run_json_report

pytestmark = pytest.mark.skipif(not torch.backends.cuda.is_built(),
                                reason="fake CUDA tensors need torch's CUDA build (a CPU-only wheel has none)")


@pytest.fixture(scope="module")
def report():
    return run_json_report("dreamllm_fast.export.check_graphs")


def test_whole_step_captures_at_512_without_host_work(report):
    print(json.dumps(report, indent=1))
    assert report["resolution"] == 512
    assert report["group_norms_left"] == {"unet": 0, "vae": 0}
    for n in (1, 2):
        s = report[f"whole step, {n} image(s)"]
        assert s["latents"] == [1, 4, 64, 64] and s["step index"] == 2  # capture+replay, then a replay
        # every GroupNorm of the U-Net runs the fused kernel: two launches each (statistics, apply)
        assert s["triton launches per replay"] > 0 and s["triton launches per replay"] % 2 == 0
    assert report["vae image"] == [1, 3, 512, 512]
    assert report["captures"] == 3 and report["replays"] == 5
    assert 0 < report["pool_bytes_estimate"] < 40 * 2**30
