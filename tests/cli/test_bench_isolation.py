"""A bench that survives (issue 10): every stage and baseline isolated, the report on disk after
every stage, child-process baselines whose crash or timeout is a row, a budget that skips and
says so. CPU, tiny preset: plumbing, not performance."""
import json
import os
import time
from pathlib import Path

import pytest
import torch

import dreamllm_fast.bench.run as run_mod
from conftest import requires_cuda
from dreamllm_fast.bench import isolated, stages
from dreamllm_fast.bench.harness import bench_fn, bench_with_setup
from dreamllm_fast.cli import main

HERE = Path(__file__).resolve().parent


def _bench(out, *extra):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--out", str(out), *extra]) == 0
    return json.loads((out / "report.json").read_text())


def _alive(pid: int) -> bool:
    """Running (a zombie left for an init that does not reap counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def planted_path(monkeypatch):
    """Children can import tests/cli/bench_planted.py."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


def test_a_failing_stage_is_an_error_row_and_the_report_is_on_disk_before_the_next(tmp_path, monkeypatch):
    out, seen = tmp_path / "r", {}
    real_projection = stages.RUNNERS["projection"]

    def broken_prefill(models, s):
        raise ValueError("planted prefill failure")

    def projection(models, s):  # what a reader (or a killed run) finds on disk at this point
        seen["report"] = json.loads((out / "report.json").read_text())
        seen["md"] = (out / "report.md").read_text()
        return real_projection(models, s)

    monkeypatch.setitem(stages.RUNNERS, "prefill", broken_prefill)
    monkeypatch.setitem(stages.RUNNERS, "projection", projection)
    rep = _bench(out, "--stages", "prefill", "projection", "--backends", "reference")
    err = [r for r in rep["rows"] if r["stage"] == "prefill"]
    assert len(err) == 1 and err[0]["error_type"] == "ValueError"
    assert "planted prefill failure" in err[0]["error"] and "broken_prefill" in err[0]["where"]
    assert {r["provider"] for r in rep["rows"] if r["stage"] == "projection" and "ms" in r} == {"engine", "reference"}
    assert seen["report"]["meta"]["status"] == "running" and seen["report"]["rows"] == err
    assert "Partial report" in seen["md"] and "planted prefill failure" in seen["md"]
    assert rep["meta"]["status"] == "complete"


def test_a_run_that_dies_mid_stage_leaves_the_earlier_stages_on_disk(tmp_path, monkeypatch):
    def dies(models, s):
        raise KeyboardInterrupt  # Ctrl-C: not an Exception, so no stage isolation catches it

    monkeypatch.setitem(stages.RUNNERS, "decode", dies)
    out = tmp_path / "r"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--backends", "reference",
                 "--stages", "projection", "decode"]) == 130
    rep = json.loads((out / "report.json").read_text())
    assert rep["meta"]["status"] == "running"
    assert {(r["stage"], r["provider"]) for r in rep["rows"]} == {("projection", "engine"), ("projection", "reference")}


def test_a_provider_that_fails_does_not_take_the_others(tmp_path, monkeypatch):
    from dreamllm_fast.engine.model import EngineModel

    def no_sessions(self):
        raise RuntimeError("planted: no session")

    monkeypatch.setattr(EngineModel, "new_session", no_sessions)
    rep = _bench(tmp_path / "r", "--stages", "dream", "decode", "--no-compile-baseline",
                 "--backends", "engine", "reference")
    by = {}
    for r in rep["rows"]:
        by.setdefault((r["stage"], r["provider"]), []).append(r)
    for stage, n in (("dream", 1), ("decode", 2)):  # decode: one row per context
        assert [r["error_type"] for r in by[stage, "engine"]] == ["RuntimeError"] * n
        assert "no_sessions" in by[stage, "engine"][0]["where"]
        assert len(by[stage, "reference"]) == n and all(r["ms"] > 0 for r in by[stage, "reference"])


def test_a_crashing_child_baseline_is_an_error_row_and_keeps_its_rows(tmp_path, monkeypatch, planted_path):
    monkeypatch.setitem(isolated.JOBS, "compile_static", isolated.Job("bench_planted:crash", needs_cuda=False))
    rep = _bench(tmp_path / "r", "--stages", "decode", "projection", "--backends", "reference")
    cs = [r for r in rep["rows"] if r["provider"] == "compile_static"]
    assert cs[0].get("planted") and cs[0]["ms"] == 1.0  # written before the child died
    assert cs[1]["error_type"] == "ChildCrashed" and "exit" in cs[1]["error"] and "code 3" in cs[1]["error"]
    assert any(r["stage"] == "projection" and "ms" in r for r in rep["rows"])  # the run went on
    assert "decode/compile_static" in (tmp_path / "r" / "report.md").read_text()


def test_a_child_past_its_timeout_is_killed_and_reported(tmp_path, monkeypatch, planted_path):
    monkeypatch.setitem(isolated.JOBS, "hang", isolated.Job("bench_planted:hang", needs_cuda=False))
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    rows = isolated.run_isolated("hang", {"device": "cpu", "options": {"pid_file": str(pid_file)}},
                                 stage="unet", provider="compiled", timeout_s=3)
    assert time.monotonic() - t0 < 30
    assert len(rows) == 1 and rows[0]["error_type"] == "Timeout" and "3 s" in rows[0]["error"]
    pids = [int(p) for p in pid_file.read_text().split()]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "the child or its worker outlived the timeout"


def test_an_exception_in_the_child_is_a_row_not_a_crash(monkeypatch, planted_path):
    monkeypatch.setitem(isolated.JOBS, "boom", isolated.Job("bench_planted:raise_error", needs_cuda=False))
    rows = isolated.run_isolated("boom", {"device": "cpu", "options": {}}, stage="vae", provider="compiled",
                                 timeout_s=60, fields={"context": 7})
    assert len(rows) == 1 and rows[0]["error_type"] == "ValueError" and rows[0]["context"] == 7
    assert "bench_planted.py" in rows[0]["where"] and rows[0]["isolated"]


def test_a_cuda_job_on_the_cpu_is_reported_not_started():
    rows = isolated.run_isolated("compile_static", {"device": "cpu"}, stage="decode",
                                 provider="compile_static", timeout_s=60)
    assert rows[0]["error_type"] == "NeedsCUDA"


def test_budget_skips_the_stages_that_would_start_after_it_and_says_so(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(run_mod, "_monotonic", lambda: clock[0])
    real_prefill = stages.RUNNERS["prefill"]

    def slow_prefill(models, s):
        clock[0] += 1000.0  # this stage "takes" 1000 s
        return real_prefill(models, s)

    monkeypatch.setitem(stages.RUNNERS, "prefill", slow_prefill)
    rep = _bench(tmp_path / "r", "--stages", "prefill", "decode", "projection", "--budget-s", "600",
                 "--backends", "reference")
    assert [r["stage"] for r in rep["rows"] if "ms" in r] == ["prefill"]
    skipped = rep["meta"]["skipped"]
    assert [s["stage"] for s in skipped] == ["decode", "projection"]
    assert all("budget of 600 s spent" in s["reason"] for s in skipped)
    assert not any(r["provider"] == "compile_static" for r in rep["rows"])  # its stage never started
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Skipped: decode/*: budget of 600 s spent" in md


def test_a_broken_cuda_context_skips_the_remaining_in_process_stages(tmp_path, monkeypatch):
    def fails(models, s):
        raise RuntimeError("CUDA error: device-side assert triggered (planted)")

    monkeypatch.setitem(stages.RUNNERS, "prefill", fails)
    monkeypatch.setattr(run_mod, "_cuda_problem", lambda device: "AcceleratorError: planted")
    out = tmp_path / "r"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--stages", "prefill",
                 "projection", "--backends", "reference"]) == 1  # nothing measured: a failed run
    rep = json.loads((out / "report.json").read_text())
    assert rep["rows"][0]["error_type"] == "RuntimeError"
    assert rep["rows"][1]["stage"] == "projection" and "CUDA context is unusable" in rep["rows"][1]["skipped"]


def test_the_static_cache_baseline_resets_and_refills_instead_of_rewinding():
    """Three runs over one StaticCache (compile off on the CPU: same cache handling) give the
    reference's greedy tokens and logits each time. Rewinding by position instead overflows the
    cache (the H100's index-out-of-bounds assert) or reads stale entries."""
    from dreamllm_fast.bench.baselines import StaticCacheDecoder
    from dreamllm_fast.bench.models import build_models
    from dreamllm_fast.bench.stages import _embeds

    ref = build_models(["reference"], "tiny", None, torch.device("cpu"), torch.float32)["reference"]
    ctx, n = 20, 6
    sess = ref.new_session()
    logits = sess.extend(_embeds(ref, ctx))
    want = []
    for _ in range(n):
        want.append(int(logits.argmax()))
        logits = sess.extend(ref.embed_tokens(want[-1:]))
    last_ref = logits  # after the n-th token, as the decoder's last step
    dec = StaticCacheDecoder(ref, ctx, n, compile=False)
    for _ in range(3):
        dec.prefill()
        assert dec.decode().tolist() == want
        err = (dec.last_logits[0] - last_ref).abs().max().item()
        assert err < 1e-4, err  # fp32, same weights: only summation order differs


def test_bench_fn_times_slow_calls_in_few_reps_and_setup_outside_the_timing():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.21)

    med, p20, p80, first = bench_fn(slow)
    assert 1 + 1 <= len(calls) <= 1 + 5 and first >= 0.2 and 200 <= med < 1000
    med, _, _ = bench_with_setup(lambda: time.sleep(0.1), lambda: time.sleep(0.005), reps=3)
    assert med < 60, med


@requires_cuda
def test_compile_static_baseline_runs_in_a_child_and_the_parent_context_survives(tmp_path):
    """On a GPU: the compile+StaticCache baseline gives a real tokens/s from its own process, and
    this process's CUDA context works afterwards (the H100 run lost 175 tests to a poisoned one)."""
    out = tmp_path / "r"
    assert main(["bench", "--preset", "tiny", "--device", "cuda", "--out", str(out), "--stages", "decode",
                 "--backends", "reference", "--contexts", "16", "--isolated-timeout-s", "45"]) == 0
    rep = json.loads((out / "report.json").read_text())
    cs = [r for r in rep["rows"] if r["provider"] == "compile_static"]
    assert len(cs) == 1 and cs[0].get("tokens_per_s", 0) > 0, cs
    assert cs[0]["compile_s"] > 0 and cs[0]["isolated"]
    torch.cuda.synchronize()
    assert torch.ones(4, device="cuda").sum().item() == 4.0


def test_the_real_child_jobs_run_end_to_end_on_the_cpu(monkeypatch):
    """The GPU-only jobs' own code, on the CPU: compile_static with compile off, through a real
    child process; the diffusion-backend job in-process with the eager kind."""
    from dreamllm_fast.bench.baselines import diffusion_backend_job

    spec = {"preset": "tiny", "checkpoint": None, "device": "cpu", "dtype": "float32",
            "ceilings": {"copy_gbps": 10.0, "fp32_gemm_tflops_cpu": 0.1},
            "settings": {"contexts": [16, 24], "decode_tokens": 3}}
    monkeypatch.setitem(isolated.JOBS, "compile_static", isolated.Job(isolated.JOBS["compile_static"].target,
                                                                      needs_cuda=False))
    rows = isolated.run_isolated("compile_static", {**spec, "options": {"compile": False}}, stage="decode",
                                 provider="compile_static", timeout_s=240)
    assert [r["context"] for r in rows] == [16, 24], rows
    assert all(r["tokens_per_s"] > 0 and r["compile_s"] > 0 and r["warmup_s"] > 0 and r["isolated"] for r in rows)
    assert all(r["floor_ms"] > 0 for r in rows)  # from the parent's ceilings, not re-measured
    got = []
    for comp in ("unet", "vae"):
        diffusion_backend_job({**spec, "stage": comp, "provider": "eager",
                               "options": {"component": comp, "kind": "eager", "floor_ms": 0.5}}, got.append)
    assert [(r["stage"], r["provider"]) for r in got] == [("unet", "eager"), ("vae", "eager")]
    assert all(r["ms"] > 0 and r["frac_of_floor"] == 0.5 / r["ms"] and r["autotune"] is False for r in got)
