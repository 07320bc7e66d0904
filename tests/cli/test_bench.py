"""`dreamllm-fast bench` on the CPU with the tiny preset: the command's plumbing, not performance;
and the report/README generator over committed GPU reports."""
import json

from dreamllm_fast.bench.harness import REPO
from dreamllm_fast.bench.report import (README_END, README_START, latest_gpu_report, markdown,
                                        readme_section, speedups)
from dreamllm_fast.cli import main


def test_bench_tiny_writes_json_markdown_chart(tmp_path, capsys):
    # --device cpu on every machine: on a GPU the same smoke run would compile (minutes); the
    # CUDA path of the compile baseline has its own test (test_bench_isolation.py).
    out = tmp_path / "r"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--out", str(out),
                 "--stages", "prefill", "decode", "dream", "projection", "unet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["env"]["torch"] and "git_sha" in rep["env"] and "date" in rep["env"]
    assert rep["ceilings"]["copy_gbps"] > 0 and rep["meta"]["smoke_run_not_a_claim"] is True
    assert rep["meta"]["status"] == "complete" and rep["meta"]["skipped"] == []
    got = {(r["stage"], r["provider"]) for r in rep["rows"] if "ms" in r}
    # the engine's graph and eager paths side by side where they differ, beside the reference
    for stage in ("prefill", "decode", "dream"):
        assert {(stage, "engine"), (stage, "engine_eager"), (stage, "reference")} <= got
    assert {("projection", "engine"), ("projection", "reference"), ("unet", "eager")} <= got
    assert not any(p == "engine_eager" for st, p in got if st in ("projection", "unet"))
    decode = [r for r in rep["rows"] if r["stage"] == "decode" and "ms" in r]
    assert len(decode) == 6 and all(r["tokens_per_s"] > 0 and 0 < r["frac_of_floor"] for r in decode)
    # the compile baseline is reported as not measured (no CUDA), never silently dropped
    assert any(r["provider"] == "compile_static" and r.get("error_type") == "NeedsCUDA" for r in rep["rows"])
    md = (out / "report.md").read_text()
    assert "smoke run, not a performance claim" in md and "| decode | engine_eager | 16 |" in md
    assert "| decode | 16 | engine | engine_eager |" in md  # graph path vs eager path
    assert (out / "report.png").stat().st_size > 1000
    assert "frac_of_floor" in capsys.readouterr().out


def test_speedups_pair_engine_with_baselines_and_backends_with_eager():
    rows = [{"stage": "decode", "provider": "engine", "context": 128, "ms": 2.0},
            {"stage": "decode", "provider": "reference", "context": 128, "ms": 10.0},
            {"stage": "decode", "provider": "engine_eager", "context": 128, "ms": 4.0},
            {"stage": "decode", "provider": "reference", "context": 1024, "ms": 99.0},
            {"stage": "decode", "provider": "compile_static", "context": 128, "error": "x"},
            {"stage": "unet", "provider": "eager", "ms": 30.0},
            {"stage": "unet", "provider": "compiled", "ms": 20.0}]
    assert speedups(rows) == [
        {"stage": "decode", "context": 128, "provider": "engine", "baseline": "reference", "speedup": 5.0},
        {"stage": "decode", "context": 128, "provider": "engine", "baseline": "engine_eager", "speedup": 2.0},
        {"stage": "unet", "context": None, "provider": "compiled", "baseline": "eager", "speedup": 1.5}]


def test_readme_results_section_is_generated_not_typed():
    """The README's results block equals what the generator makes from committed GPU reports."""
    text = (REPO / "README.md").read_text()
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    assert text[start:end] == readme_section(REPO), (
        "README results section is stale or hand-edited: run `python -m dreamllm_fast.bench.report --readme`")


def test_the_committed_h100_report_feeds_the_readme_with_its_regressions():
    """The H100 report of 2026-11-23 (17f6485) is read as measured: its rows, and the stages where
    the engine was slower than the reference, show in the generated section."""
    p = REPO / "benchmarks/results/NVIDIA_H100_80GB_HBM3/2026-11-23_17f6485/report.json"
    rep = json.loads(p.read_text())
    assert rep["env"]["git_sha"].startswith("17f6485") and rep["env"]["gpu"] == "NVIDIA H100 80GB HBM3"
    md = markdown(rep)
    assert "| decode | engine | 128 | 185.6 | 172.4 |" in md
    slow = md.split("**Slower than its baseline**: ")[1]
    for stage in ("prefill engine vs reference", "dream engine vs reference", "projection engine vs reference"):
        assert stage in slow
    assert "decode" not in slow  # decode was 4.1x / 6.5x faster than the reference
    if latest_gpu_report(REPO) == p:  # until a newer report replaces it
        section = readme_section(REPO)
        # every stage with the engine beside its baselines and its fraction of the floor, targets
        assert "| decode | 128 | 141.6 | 185.6 (0.76 of floor) | 769.3 (0.18 of floor) |" in section
        assert "| decode >= 6x transformers eager (reference) | 4.144 (worst at context 128) | missed |" in section


def test_cpu_reports_never_feed_the_readme(tmp_path):
    d = tmp_path / "benchmarks" / "results" / "cpu" / "2026"
    d.mkdir(parents=True)
    rep = {"env": {"gpu": None, "date": "2026"}, "ceilings": {}, "meta": {"dtype": "fp32", "preset": "tiny"}, "rows": []}
    (d / "report.json").write_text(json.dumps(rep))
    assert latest_gpu_report(tmp_path) is None
    rep["env"]["gpu"] = "NVIDIA H100 80GB HBM3"
    (d / "report.json").write_text(json.dumps(rep))
    assert latest_gpu_report(tmp_path) == d / "report.json"
    assert "H100" in markdown(rep)


def test_engine_eager_runs_only_where_it_differs_from_engine():
    from dreamllm_fast.bench.stages import STAGES, models_for

    models = {"engine": 1, "engine_eager": 2, "reference": 3}
    for stage in STAGES:
        want = {"engine", "reference"} | ({"engine_eager"} if stage in ("prefill", "decode", "dream") else set())
        assert set(models_for(stage, models)) == want, stage
