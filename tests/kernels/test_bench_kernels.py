"""The kernel benchmarks' plumbing (never their timings): a failing provider becomes an error row,
results are on disk after every case, the launch-overhead benchmark runs without a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.kernel_common import ResultFile, add_gbps, measure
from dreamllm_fast.bench.harness import REPO


def test_a_failing_provider_is_an_error_row_and_the_other_figure_is_kept():
    bad = measure("broken", lambda: 1 / 0, case="x")
    assert bad["provider"] == "broken" and bad["case"] == "x"
    assert "ZeroDivisionError" in bad["eager_error"]
    assert ("ZeroDivisionError" if torch.cuda.is_available() else "NVIDIA GPU") in bad["graph_error"]
    assert "eager_us" not in bad and "graph_us" not in bad
    good = measure("ok", lambda: torch.ones(3).sum())
    assert good["eager_us"] > 0
    if not torch.cuda.is_available():
        assert "graph_us" not in good and "NVIDIA GPU" in good["graph_error"]
    assert "gbps" not in add_gbps(dict(bad), 1e6, 1000.0), "no rate without a GPU time"
    assert add_gbps({"graph_us": 2.0}, 4e6, 1000.0) == {"graph_us": 2.0, "gbps": 2000.0, "frac_copy_bw": 2.0}


def test_results_are_written_after_every_case(tmp_path):
    res = ResultFile("plumbing", tmp_path)
    res.add([{"provider": "a", "eager_us": 1.0}])
    first = json.loads((tmp_path / "plumbing.json").read_text())
    assert [r["provider"] for r in first["rows"]] == ["a"] and "env" in first and "ceilings" in first
    res.add([{"provider": "b", "error": "boom"}])
    second = json.loads((tmp_path / "plumbing.json").read_text())
    assert [r["provider"] for r in second["rows"]] == ["a", "b"]
    assert second["smoke"] == (not torch.cuda.is_available())


def test_launch_overhead_host_mode_runs_without_a_gpu(tmp_path):
    """Every op's launcher runs to the (stubbed) kernel launch at the 7B shapes on CPU tensors."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_launch_overhead", "--quick", "--mode", "host",
                           "--triton-run", "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout[-3000:])
    rows = json.loads((tmp_path / "launch_overhead.json").read_text())["rows"]
    ops = {r["op"].split("_T")[0].split("_B")[0].split("_N")[0] for r in rows}
    assert ops == {"rmsnorm_residual", "rmsnorm", "silu_and_mul", "decode_attention", "append_attention",
                   "dream_projection"}
    bad = [r for r in rows if "error" in r or not r.get("host_us", 0) > 0]
    assert not bad, bad
    assert len({r["provider"] for r in rows}) == 2, "our Python alone, and with Triton's JITFunction.run"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA; none found")
def test_graph_time_is_measured_on_a_gpu():
    row = measure("ok", lambda: torch.ones(1024, device="cuda").sum())
    assert row["graph_us"] > 0 and row["eager_us"] > 0
