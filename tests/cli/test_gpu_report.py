"""`python -m benchmarks.gpu_report` on the CPU: phase orchestration with tiny fake phases
(timeouts, failures, budget), a flat output folder of at most 8 files, the per-test recorder,
merging, and publishing into benchmarks/results with the README regenerated."""
import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_report as G
from dreamllm_fast.bench.harness import REPO
from dreamllm_fast.bench.report import README_END, README_START

ARGS = argparse.Namespace(test_timeout=60, kernels_full=False, diffusion_backends=["eager"], autotune=False)


def _py(code):
    return [sys.executable, "-c", code]


def _phase(name, timeout, *codes, collect=lambda ctx: None, log="gpu_report.log"):
    return G.Phase(name, timeout, lambda ctx: [_py(c.format(out=ctx.out, work=ctx.work)) for c in codes],
                   collect, log)


def _flat_and_few(out):
    entries = list(out.iterdir())
    assert all(p.is_file() for p in entries), "the output folder must be flat"
    assert len(entries) <= 8 and {p.name for p in entries} <= set(G.OUT_FILES), sorted(p.name for p in entries)


def test_phases_run_in_order_time_out_fail_and_the_run_goes_on(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    collected = []
    phases = [
        _phase("env", 30, "open(r'{out}/env.json', 'w').write('{{}}')"),
        _phase("tests", 2, "print('first group ran', flush=True)",
               "import time; print('hanging', flush=True); time.sleep(60)", "print('never runs')",
               collect=lambda ctx: collected.append("tests"), log="tests.log"),
        _phase("kernels", 30, "import sys; sys.exit(3)", collect=lambda ctx: collected.append("kernels")),
        _phase("e2e", 30, "open(r'{work}/e2e.txt', 'w').write('x')"),
    ]
    t0 = time.monotonic()
    recs = G.run_phases(phases, out, work, ARGS, budget_s=120)
    assert time.monotonic() - t0 < 60
    st = {r["name"]: r for r in recs}
    assert [r["name"] for r in recs] == ["env", "tests", "kernels", "e2e"]
    assert st["env"]["status"] == "ok" and st["e2e"]["status"] == "ok"
    assert st["tests"]["status"] == "timeout"
    assert [s["status"] for s in st["tests"]["steps"]] == ["ok", "timeout", "skipped"]
    assert st["kernels"]["status"] == "failed" and st["kernels"]["steps"][0]["rc"] == 3
    assert collected == ["tests", "kernels"]  # collectors run after a timeout or a failure
    assert json.loads((out / "phases.json").read_text()) == recs
    log = (out / "tests.log").read_text()
    assert "first group ran" in log and "hanging" in log and "never runs" not in log
    assert "phase kernels: failed" in (out / "gpu_report.log").read_text()
    assert (work / "e2e.txt").is_file() and not (out / "e2e.txt").exists()
    _flat_and_few(out)


def test_the_budget_bounds_the_run_and_skips_later_phases(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "MAX_FILE_BYTES", 4096)
    out = tmp_path / "out"
    phases = [_phase("env", 30, "print('x' * 20000, flush=True); import time; time.sleep(60)"),
              _phase("tests", 30, "print(1)")]
    t0 = time.monotonic()
    recs = G.run_phases(phases, out, tmp_path / "w", ARGS, budget_s=3)
    assert time.monotonic() - t0 < 30
    assert recs[0]["status"] == "timeout" and recs[1]["status"] == "skipped"
    assert "budget of 3 s spent" in recs[1]["reason"]
    log = (out / "gpu_report.log").read_bytes()
    assert len(log) <= 4096 and log.startswith(b"[truncated by gpu_report")  # fits what comes back


def test_phase_selection_and_bad_names(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(G, "run_phases", lambda phases, out, work, args, budget: ran.extend(
        p.name for p in phases) or [])
    assert G.main(["--out", str(tmp_path), "--phases", "e2e", "env"]) == 0
    assert ran == ["env", "e2e"]  # always the canonical order
    with pytest.raises(SystemExit) as e:
        G.main(["--out", str(tmp_path), "--phases", "benchmarks"])
    assert e.value.code == 2 and "invalid choice: 'benchmarks'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        G.main(["--phases", "env"])  # no --out
    assert "--out DIR is required" in capsys.readouterr().err


def test_real_phase_commands_fit_the_session_limits():
    assert sum(p.timeout_s for p in G.PHASES.values()) <= G.BUDGET_S == 900
    # the two documented calls each fit in a 10-minute command with room to install wheels
    assert sum(G.PHASES[p].timeout_s for p in ("env", "tests", "kernels")) <= 540
    assert sum(G.PHASES[p].timeout_s for p in ("env", "e2e", "diffusion")) <= 540
    assert len(G.OUT_FILES) <= 8
    ctx = G.Ctx(out=REPO / "o", work=REPO / "w", args=ARGS, allowance_s=300)
    (argv,) = G.PHASES["e2e"].steps(ctx)
    assert argv[argv.index("--budget-s") + 1] == "270"  # the bench stops starting stages in time
    assert all("--record-json" in " ".join(a) for a in G.PHASES["tests"].steps(ctx))


def test_cap_keeps_the_tail_of_an_oversized_file(tmp_path):
    (tmp_path / "gpu_report.log").write_text("head\n" + "x" * 5000 + "\nthe end\n")
    G._cap_files(tmp_path, limit=1000)
    text = (tmp_path / "gpu_report.log").read_text()
    assert len(text) <= 1000 and text.endswith("the end\n") and "head\n" not in text


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


def _h100_report():
    return json.loads((REPO / "benchmarks/results/NVIDIA_H100_80GB_HBM3/2026-11-23_17f6485/report.json").read_text())


def test_diffusion_rows_merge_into_the_e2e_report(tmp_path):
    e2e = _h100_report()
    G._merge_report(tmp_path, e2e)
    diff = {"env": e2e["env"], "ceilings": e2e["ceilings"],
            "meta": {**e2e["meta"], "settings": {"stages": ["unet", "vae"]}, "skipped": []},
            "rows": [{"stage": "unet", "provider": "eager", "ms": 30.0},
                     {"stage": "unet", "provider": "compiled", "ms": 20.0, "compile_s": 41.0, "isolated": True},
                     {"stage": "vae", "provider": "eager", "ms": 21.0}]}
    G._merge_report(tmp_path, diff)
    G._merge_report(tmp_path, diff)  # a re-run replaces its stages' rows, never doubles them
    rep = json.loads((tmp_path / "report.json").read_text())
    assert [r["provider"] for r in rep["rows"] if r["stage"] == "unet"] == ["eager", "compiled"]
    assert not any(r["stage"] == "vae" and r["ms"] > 22 for r in rep["rows"])  # the H100 vae row was replaced
    assert rep["meta"]["settings"]["stages"][-1] == "unet" and rep["rows"][0]["stage"] == "prefill"
    md = (tmp_path / "report.md").read_text()
    assert "| unet |  | compiled | eager | 1.5x |" in md and "compile 41 s, child process" in md


def test_publish_merges_two_calls_into_results_and_regenerates_the_readme(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "README.md").write_text(f"# x\n\n{README_START}\nSTALE-PLACEHOLDER\n{README_END}\n")
    call1, call2 = tmp_path / "c1", tmp_path / "c2"
    call1.mkdir(), call2.mkdir()
    env = {"gpu": "NVIDIA H200", "date": "2026-12-01T10:00:00+00:00", "git_sha": "abcdef0123456"}
    (call1 / "env.json").write_text(json.dumps(env))
    (call1 / "tests.json").write_text("{}")
    (call1 / "phases.json").write_text(json.dumps([{"name": "tests", "status": "ok"}]))
    (call1 / "gpu_report.log").write_text("call one\n")
    rep = _h100_report()
    rep["env"].update(env)
    (call2 / "env.json").write_text(json.dumps(env))
    (call2 / "report.json").write_text(json.dumps(rep))
    (call2 / "phases.json").write_text(json.dumps([{"name": "e2e", "status": "ok"}]))
    (call2 / "gpu_report.log").write_text("call two\n")
    dest = G.publish([call1, call2], root)
    assert dest == root / "benchmarks/results/NVIDIA_H200/2026-12-01_abcdef0"
    assert sorted(p.name for p in dest.iterdir()) == ["env.json", "gpu_report.log", "phases.json",
                                                       "report.json", "tests.json"]
    assert [p["name"] for p in json.loads((dest / "phases.json").read_text())] == ["tests", "e2e"]
    assert len(json.loads((dest / "env.json").read_text())["calls"]) == 2
    log = (dest / "gpu_report.log").read_text()
    assert "call one" in log and "call two" in log
    readme = (root / "README.md").read_text()
    assert "NVIDIA H200" in readme and "STALE-PLACEHOLDER" not in readme and "| decode | engine | 128 | 185.6 |" in readme
