"""`python -m benchmarks.gpu_report` on the CPU: the one-call plan (order, budgets, skips, the
flat folder of at most 8 files, the exit status), the fail-fast wheel check, the collectors that
turn each phase's output into report.json, the per-test recorder, and publishing one folder into
benchmarks/results with the README regenerated. Fake phases are tiny `python -c` children; the
real smoke run (`--smoke`) runs the env and kernels phases for real on the tiny shapes."""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_report as G
from dreamllm_fast.bench.harness import REPO
from dreamllm_fast.bench.report import README_END, README_START

ARGS = argparse.Namespace(test_timeout=60, smoke=True, named_extras=False)


def _py(code):
    return [sys.executable, "-c", code]


def _phase(name, budget, *codes, min_s=0, collect=lambda ctx: None, log="gpu_report.log", extra=False):
    return G.Phase(name, budget, min_s, "fake", lambda ctx: [_py(c.format(out=ctx.out, work=ctx.work)) for c in codes],
                   collect, log, extra)


def _flat_and_few(out):
    entries = list(out.iterdir())
    assert all(p.is_file() for p in entries), "the output folder must be flat"
    assert len(entries) <= G.MAX_FILES == 8 and {p.name for p in entries} <= set(G.OUT_FILES), \
        sorted(p.name for p in entries)


def test_phases_run_in_order_time_out_fail_and_the_run_goes_on(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    collected = []
    phases = [
        _phase("env", 30, "open(r'{out}/env.json', 'w').write('{{}}')"),
        _phase("tests", 2, "print('first group ran', flush=True)",
               "import time; print('hanging', flush=True); time.sleep(60)", "print('never runs')",
               collect=lambda ctx: collected.append("tests"), log="tests.log"),
        _phase("kernels", 30, "import sys; sys.exit(3)", collect=lambda ctx: collected.append("kernels")),
        _phase("core", 30, "open(r'{work}/core.txt', 'w').write('x')"),
    ]
    t0 = time.monotonic()
    recs = G.run_phases(phases, out, work, ARGS, budget_s=120)
    assert time.monotonic() - t0 < 60
    st = {r["name"]: r for r in recs}
    assert [r["name"] for r in recs] == ["env", "tests", "kernels", "core"]
    assert st["env"]["status"] == "ok" and st["core"]["status"] == "ok"
    assert st["tests"]["status"] == "timeout"
    assert [s["status"] for s in st["tests"]["steps"]] == ["ok", "timeout", "skipped"]
    assert st["kernels"]["status"] == "failed" and st["kernels"]["steps"][0]["rc"] == 3
    assert collected == ["tests", "kernels"]  # collectors run after a timeout or a failure
    assert json.loads((out / "phases.json").read_text()) == recs
    log = (out / "tests.log").read_text()
    assert "first group ran" in log and "hanging" in log and "never runs" not in log
    assert "phase kernels: failed" in (out / "gpu_report.log").read_text()
    assert (work / "core.txt").is_file() and not (out / "core.txt").exists()
    g = json.loads((out / "report.json").read_text())["meta"]["gpu_report"]  # kept after every phase
    assert [p["status"] for p in g["phases"]] == ["ok", "timeout", "failed", "ok"] and g["elapsed_s"] < 60
    assert G.exit_status(recs, named=False) == 1
    _flat_and_few(out)


def test_a_phase_that_does_not_fit_the_budget_left_is_skipped_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "MAX_FILE_BYTES", 4096)
    out = tmp_path / "out"
    phases = [_phase("env", 3, "print('x' * 20000, flush=True); import time; time.sleep(60)"),  # its 3 s
              _phase("core", 30, "print(1)", min_s=5),  # needs 5 s, ~5 s left
              _phase("kernels", 30, "print(1)"),  # min 0: runs in what is left
              _phase("compile", 8, "print(1)", extra=True, min_s=1),  # extra: needs its whole budget
              _phase("diffusion", 30, "print(1)", min_s=30)]
    t0 = time.monotonic()
    recs = G.run_phases(phases, out, tmp_path / "w", ARGS, budget_s=8)
    assert time.monotonic() - t0 < 30
    assert [r["status"] for r in recs] == ["timeout", "skipped", "ok", "skipped", "skipped"]
    assert "the phase needs 5 s" in recs[1]["reason"] and "of the 8 s budget" in recs[1]["reason"]
    log = (out / "gpu_report.log").read_bytes()
    assert len(log) <= 4096 and log.startswith(b"[truncated by gpu_report")  # fits what comes back
    # an extra phase runs in leftover time when its whole budget is left
    recs = G.run_phases([_phase("env", 5, "print(1)"), _phase("compile", 5, "print(1)", extra=True)],
                        tmp_path / "o2", tmp_path / "w", ARGS, budget_s=60)
    assert [r["status"] for r in recs] == ["ok", "ok"]


def test_the_out_folder_keeps_only_the_report_files(tmp_path):
    out = tmp_path / "out"
    recs = G.run_phases([_phase("env", 30, "open(r'{out}/stray.json', 'w').write('x'); "
                                           "open(r'{out}/tests.json', 'w').write('{{}}')")],
                        out, tmp_path / "w", ARGS, budget_s=60)
    assert recs[0]["status"] == "ok" and not (out / "stray.json").exists()
    assert "removed stray.json" in (out / "gpu_report.log").read_text()
    _flat_and_few(out)


def test_cap_keeps_the_tail_of_an_oversized_file(tmp_path):
    (tmp_path / "gpu_report.log").write_text("head\n" + "x" * 5000 + "\nthe end\n")
    G._cap_files(tmp_path, limit=1000)
    text = (tmp_path / "gpu_report.log").read_text()
    assert len(text) <= 1000 and text.endswith("the end\n") and "head\n" not in text


def test_the_plan_fits_480_s_in_order_of_value(capsys):
    default = [p for p in G.PHASES.values() if not p.extra]
    assert [p.name for p in default] == ["env", "core", "tests", "serve", "diffusion", "kernels"]
    assert G.planned_total() == sum(p.budget_s for p in default) <= G.BUDGET_S == 480
    assert all(p.min_s <= p.budget_s for p in G.PHASES.values())
    assert len(G.OUT_FILES) <= G.MAX_FILES
    assert G.main(["--plan"]) == 0
    text = capsys.readouterr().out
    assert f"planned total {G.planned_total():g} s of the 480 s budget (fits)" in text
    assert G.INSTALL in text and "pydantic==" in text and "diffusers==" in text
    assert all(text.index(a) < text.index(b) for a, b in zip(("env ", "core ", "tests ", "serve "),
                                                              ("core ", "tests ", "serve ", "diffusion ")))
    assert G.main(["--plan", "--budget-s", "300"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_every_test_path_of_the_tests_phase_exists():
    for _, args in G.TEST_GROUPS:
        for a in args:
            if a.startswith("tests"):
                assert (REPO / a).exists(), f"{a} is gone: update gpu_report.TEST_GROUPS"


def test_a_variant_is_one_line_in_the_table(monkeypatch):
    """The int8 engine (or any bench variant) joins the report as one Variant line."""
    monkeypatch.setattr(G, "VARIANTS", G.VARIANTS + (G.Variant("core_int8", 45, 30, ("decode",),
                                                                ("--weights", "int8")),))
    phases = G._phases()
    ctx = G.Ctx(out=REPO / "o", work=REPO / "w", args=argparse.Namespace(smoke=False), allowance_s=45)
    (argv,) = phases["core_int8"].steps(ctx)
    assert argv[argv.index("--stages") + 1:] == ["decode", "--weights", "int8"]
    assert argv[argv.index("--budget-s") + 1] == "25"  # the bench stops starting stages in time
    (argv,) = phases["core"].steps(ctx)
    assert "--no-compile-baseline" in argv and "reference" in argv and "engine_eager" in argv


def test_a_missing_wheel_stops_the_run_before_any_phase(tmp_path, monkeypatch, capsys):
    real = G.importlib.util.find_spec
    monkeypatch.setattr(G.importlib.util, "find_spec", lambda m, *a: None if m == "pydantic" else real(m, *a))
    ran = []
    monkeypatch.setattr(G, "run_phases", lambda *a, **k: ran.append(1) or [])
    assert G.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "missing package(s) pydantic==2.14.4" in err and G.INSTALL in err
    assert not ran and not (tmp_path / "out").exists()


def test_phase_selection_and_bad_names(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(G, "run_phases", lambda phases, out, work, args, budget: ran.extend(
        p.name for p in phases) or [])
    assert G.main(["--out", str(tmp_path), "--phases", "serve", "env"]) == 0
    assert ran == ["env", "serve"]  # always the canonical order
    with pytest.raises(SystemExit) as e:
        G.main(["--out", str(tmp_path), "--phases", "benchmarks"])
    assert e.value.code == 2 and "invalid choice: 'benchmarks'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        G.main(["--phases", "env"])  # no --out
    assert "--out DIR is required" in capsys.readouterr().err


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cpu_smoke_run_of_the_real_cli(tmp_path):
    """The real command on the CPU: env and kernels phases run for real (tiny, interpreter), files
    land in --out as they finish, exit 0; with too little budget every phase is skipped, exit 1."""
    out = tmp_path / "out"
    r = _run_cli("--smoke", "--phases", "env", "kernels", "--out", str(out), "--work", str(tmp_path / "w"))
    assert r.returncode == 0, r.stdout + r.stderr
    _flat_and_few(out)
    assert {"env.json", "kernels.json", "report.json", "report.md", "phases.json", "gpu_report.log"} <= \
        {p.name for p in out.iterdir()}
    phases = json.loads((out / "phases.json").read_text())
    assert [(p["name"], p["status"]) for p in phases] == [("env", "ok"), ("kernels", "ok")]
    assert json.loads((out / "env.json").read_text())["ceilings"]["copy_gbps"] > 0
    assert "dream_projection" in json.loads((out / "kernels.json").read_text())
    rep = json.loads((out / "report.json").read_text())
    assert rep["env"]["torch"] and [p["name"] for p in rep["meta"]["gpu_report"]["phases"]] == ["env", "kernels"]
    assert "smoke run, not a performance claim" in (out / "report.md").read_text()
    out2 = tmp_path / "out2"
    r = _run_cli("--smoke", "--phases", "env", "core", "--budget-s", "5", "--out", str(out2))
    assert r.returncode == 1, r.stdout + r.stderr
    assert [p["status"] for p in json.loads((out2 / "phases.json").read_text())] == ["skipped", "skipped"]
    assert "phase core: skipped (" in (out2 / "gpu_report.log").read_text()


# ------------------------------------------------------------------------------- collectors
def _bench_report(rows, stages, gpu="NVIDIA H200"):
    return {"env": {"gpu": gpu, "date": "2026-12-01T10:00:00+00:00", "git_sha": "abcdef0123456",
                    "torch": "2.11.0"},
            "ceilings": {"copy_gbps": 4300.0, "bf16_gemm_tflops": 780.0},
            "meta": {"dtype": "bfloat16", "preset": "dreamllm-7b", "status": "complete", "skipped": [],
                     "settings": {"stages": list(stages)}},
            "rows": rows}


# Synthetic figures for the plumbing: never results (a CPU test can measure no GPU).
CORE_ROWS = [
    {"stage": "prefill", "provider": "engine", "ms": 20.0, "floor_ms": 13.0, "frac_of_floor": 0.65},
    {"stage": "prefill", "provider": "reference", "ms": 40.0, "floor_ms": 13.0, "frac_of_floor": 0.325},
    {"stage": "decode", "provider": "engine", "context": 128, "ms": 100.0, "floor_ms": 95.0, "frac_of_floor": 0.95},
    {"stage": "decode", "provider": "engine_eager", "context": 128, "ms": 400.0},
    {"stage": "decode", "provider": "reference", "context": 128, "ms": 700.0},
    {"stage": "decode", "provider": "engine", "context": 1024, "ms": 110.0, "floor_ms": 96.0, "frac_of_floor": 0.87},
    {"stage": "decode", "provider": "reference", "context": 1024, "ms": 1100.0},
]


def _ctx(tmp_path, smoke=False):
    ctx = G.Ctx(out=tmp_path / "out", work=tmp_path / "work", args=argparse.Namespace(smoke=smoke))
    ctx.out.mkdir(parents=True)
    ctx.work.mkdir(parents=True)
    return ctx


def test_collectors_merge_each_phase_into_one_report(tmp_path):
    ctx = _ctx(tmp_path)
    core = G.PHASES["core"]
    (ctx.work / "core").mkdir()
    (ctx.work / "core" / "report.json").write_text(json.dumps(_bench_report(CORE_ROWS, G.VARIANTS[0].stages)))
    core.collect(ctx)
    core.collect(ctx)  # a re-run replaces its rows, never doubles them
    (ctx.work / "compile").mkdir()
    (ctx.work / "compile" / "report.json").write_text(json.dumps(_bench_report(
        [{"stage": "decode", "provider": "reference", "context": 128, "ms": 650.0},
         {"stage": "decode", "provider": "compile_static", "context": 128, "ms": 130.0}], ["decode"])))
    G.PHASES["compile"].collect(ctx)  # keeps only the compile_static rows
    (ctx.work / "serve.json").write_text(json.dumps(
        [{"stage": "serve", "provider": "batched", "concurrency": n, "max_tokens": 128, "tokens_per_s": tps,
          "ttft_p50_ms": ttft} for n, tps, ttft in ((1, 100.0, 20.0), (4, 390.0, 25.0), (16, 1300.0, 45.0))]))
    G.PHASES["serve"].collect(ctx)
    (ctx.work / "tests_parity.json").write_text(json.dumps(
        {"finished": True, "exitstatus": 1, "tests": [{"nodeid": "a", "outcome": "passed"},
                                                       {"nodeid": "b", "outcome": "failed"}]}))
    G.PHASES["tests"].collect(ctx)
    rep = json.loads((ctx.out / "report.json").read_text())
    assert [r["phase"] for r in rep["rows"]].count("core") == len(CORE_ROWS)
    assert [r["provider"] for r in rep["rows"] if r["phase"] == "compile"] == ["compile_static"]
    assert len([r for r in rep["rows"] if r["stage"] == "serve"]) == 3
    assert rep["env"]["gpu"] == "NVIDIA H200" and rep["meta"]["gpu_report"]["tests"] == {"passed": 1, "failed": 1}
    tests = json.loads((ctx.out / "tests.json").read_text())
    assert [g["ran"] for g in tests["groups"]] == [True, False]  # the kernels group never ran
    md = (ctx.out / "report.md").read_text()
    assert "| decode | 128 | 95 | 100 (0.95 of floor) |" in md
    assert "| decode | 128 | 95 | 100 (0.95 of floor) | 400 | 130 | 700 | engine 4x engine_eager; " \
        "engine 1.3x compile_static; engine 7x reference |" in md
    assert "| 16 | 128 | 1300 | 13x | 45 |" in md
    assert "| decode >= 1.2x torch.compile + static cache (compile_static) | 1.3 (worst at context 128) | met |" in md
    assert "| decode >= 0.90 of its floor" in md and "0.87 (worst at context 1024) | missed |" in md
    assert "GPU tests: 1 failed, 1 passed" in md
    # a phase that wrote nothing says so in the report
    ctx2 = _ctx(tmp_path / "b")
    G.PHASES["serve"].collect(ctx2)
    assert "the serve phase wrote no rows" in (ctx2.out / "report.md").read_text()


def test_recorder_plugin_keeps_outcomes_drift_and_stdout(tmp_path):
    (tmp_path / "test_fake.py").write_text(
        "import time, pytest\n"
        "def test_drift(record_property):\n"
        "    print('max|got-ref| 1.5e-03')\n"
        "    record_property('drift', {'max_abs_err': 1.5e-3})\n"
        "def test_fails():\n    assert 1 == 2\n"
        "@pytest.mark.skip(reason='needs a GPU')\ndef test_skipped():\n    pass\n"
        "def test_slow():\n    time.sleep(30)\n")
    rec = tmp_path / "rec.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "pytest", "test_fake.py", "-q", "-p", "benchmarks.record_tests",
                        f"--record-json={rec}", "--record-timeout=2", "-p", "no:cacheprovider"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    data = json.loads(rec.read_text())
    by = {t["nodeid"].split("::")[1]: t for t in data["tests"]}
    assert data["finished"] and data["counts"] == {"passed": 1, "failed": 2, "skipped": 1}
    assert by["test_drift"]["properties"] == {"drift": {"max_abs_err": 1.5e-3}}
    assert "max|got-ref| 1.5e-03" in by["test_drift"]["stdout"]
    assert by["test_skipped"]["skip_reason"] == "Skipped: needs a GPU"
    assert "assert 1 == 2" in by["test_fails"]["message"]
    assert "exceeded --record-timeout 2 s" in by["test_slow"]["message"] and by["test_slow"]["duration_s"] < 20


# ------------------------------------------------------------------------------- publish
def test_publish_one_folder_into_results_and_regenerate_the_readme(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "README.md").write_text(f"# x\n\n{README_START}\nSTALE-PLACEHOLDER\n{README_END}\n")
    ctx = _ctx(tmp_path)
    (ctx.out / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "date": "2026-12-01T10:00:00+00:00",
                                                  "git_sha": "abcdef0123456", "ceilings": {"copy_gbps": 4300.0}}))
    (ctx.work / "core").mkdir()
    (ctx.work / "core" / "report.json").write_text(json.dumps(_bench_report(CORE_ROWS, ["prefill", "decode"])))
    G.PHASES["core"].collect(ctx)
    G._finish_phase(ctx.out, [{"name": "env", "status": "ok", "duration_s": 9.0},
                              {"name": "core", "status": "ok", "duration_s": 150.0},
                              {"name": "tests", "status": "skipped"}], time.monotonic() - 300)
    dest = G.publish(ctx.out, root)
    assert dest == root / "benchmarks/results/NVIDIA_H200/2026-12-01_abcdef0"
    assert {"env.json", "report.json", "report.md", "phases.json"} <= {p.name for p in dest.iterdir()}
    readme = (root / "README.md").read_text()
    assert "STALE-PLACEHOLDER" not in readme and "NVIDIA H200" in readme
    assert "| decode | 1024 | 96 | 110 (0.87 of floor) |  | 1100 | engine 10x reference |" in readme
    assert "| time to first token, 1 image + 512 text tokens: <= 1.5x its FLOP floor | 1.538" in readme
    assert "out of time: tests) | missed |" in readme  # a skipped phase: the report did not fit
    assert "| serving: aggregate tok/s with 16 concurrent requests >= 12x one request's |  | not run |" in readme
    assert "Phases: env ok (9 s), core ok (150 s), tests skipped" in readme
    with pytest.raises(SystemExit, match="never published"):
        smoke = tmp_path / "smoke"
        smoke.mkdir()
        (smoke / "env.json").write_text(json.dumps({"gpu": None, "date": "2026"}))
        G.publish(smoke, root)


def test_serve_phase_rows_on_the_tiny_model(tmp_path):
    """benchmarks/serve_inproc.py on the CPU: one row per concurrency, every request runs its full
    length (the LM head never picks a stop token), rows written as each level finishes."""
    from benchmarks import serve_inproc

    out = tmp_path / "serve.json"
    assert serve_inproc.main(["--out", str(out), "--preset", "tiny", "--device", "cpu",
                              "--concurrency", "1", "3", "--max-tokens", "5"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["stage"], r["concurrency"], r["requests_ok"]) for r in rows] == [("serve", 1, 1), ("serve", 3, 3)]
    assert [r["completion_tokens"] for r in rows] == [5, 15]
    assert all(r["tokens_per_s"] > 0 and 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and "ms" not in r for r in rows)


def test_the_serve_phase_head_never_picks_a_stop_or_an_undecodable_id():
    import torch

    from benchmarks.serve_inproc import silence

    g = torch.Generator().manual_seed(0)
    head = torch.randn(3000, 64, generator=g) * 0.02  # [V, H] like the random 7B head
    silence(head, 2000, (2, 1, 1500))
    picks = (torch.randn(4096, 64, generator=g) @ head.T).argmax(-1)  # 4096 random hidden states
    assert picks.max() < 2000 and not torch.isin(picks, torch.tensor([1, 2, 1500])).any()


def test_a_stopped_run_ends_its_running_phase_and_keeps_finished_files(tmp_path):
    """SIGTERM to the orchestrator kills the running phase's process group (its own session
    would outlive the run) and leaves the files of the phases that finished."""
    import signal

    pid_file = tmp_path / "child.pid"
    code = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from benchmarks import gpu_report as G\n"
        "out = Path(sys.argv[1])\n"
        "ph = [G.Phase('env', 30, 0, 'x', lambda c: [[sys.executable, '-c', 'print(1)']]),\n"
        f"      G.Phase('core', 60, 0, 'x', lambda c: [[sys.executable, '-c', 'import os, time; open(r\"{pid_file}\", \"w\").write(str(os.getpid())); time.sleep(60)']])]\n"
        "import signal\n"
        "for s in (signal.SIGTERM, signal.SIGINT): signal.signal(s, G._on_term)\n"
        "G.run_phases(ph, out, out.parent / 'w', None, 120)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], cwd=REPO, env=env)
    deadline = time.monotonic() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    stat = Path(f"/proc/{child}/stat")
    deadline = time.monotonic() + 10
    while stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z":  # gone, or a zombie
        assert time.monotonic() < deadline, "the phase's child outlived the stopped run"
        time.sleep(0.1)
    assert [p["name"] for p in json.loads((tmp_path / "out" / "phases.json").read_text())] == ["env"]


def test_the_samplers_phase_runs_bench_unet_and_keeps_the_kernel_files(tmp_path):
    """The extra samplers phase: bench_unet over the report's diffusion backends (the tiny preset
    in a smoke run); its rows join kernels.json beside the kernel benchmarks (8 files at most)."""
    phase = G._phases()["samplers"]
    assert phase.extra and phase.budget_s <= 150
    ctx = G.Ctx(out=tmp_path / "out", work=tmp_path / "work", args=argparse.Namespace(smoke=True))
    (argv,) = phase.steps(ctx)
    assert argv[1:3] == ["-m", "benchmarks.bench_unet"] and "tiny" in argv
    assert argv[argv.index("--backends") + 1] == ",".join(G.DIFFUSION_BACKENDS)
    ctx.out.mkdir()
    (ctx.out / "kernels.json").write_text(json.dumps({"bench_norms": {"rows": [1]}}))
    (ctx.work / "samplers").mkdir(parents=True)
    (ctx.work / "samplers" / "bench_unet.json").write_text(json.dumps({"rows": [{"backend": "graphs"}]}))
    phase.collect(ctx)
    got = json.loads((ctx.out / "kernels.json").read_text())
    assert got == {"bench_norms": {"rows": [1]}, "bench_unet": {"rows": [{"backend": "graphs"}]}}
