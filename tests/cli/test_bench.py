"""`dreamllm-fast bench` on the CPU with the tiny preset: the command's plumbing, not performance."""
import json

from dreamllm_fast.bench.harness import REPO
from dreamllm_fast.bench.report import (README_END, README_START, latest_gpu_report, markdown,
                                        readme_section, speedups)
from dreamllm_fast.cli import main


def test_bench_tiny_writes_json_markdown_chart(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["bench", "--preset", "tiny", "--out", str(out),
                 "--stages", "prefill", "decode", "projection", "unet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["env"]["torch"] and "git_sha" in rep["env"] and "date" in rep["env"]
    assert rep["ceilings"]["copy_gbps"] > 0 and rep["meta"]["smoke_run_not_a_claim"] is True
    got = {(r["stage"], r["provider"]) for r in rep["rows"] if "ms" in r}
    assert {("prefill", "engine"), ("prefill", "reference"), ("decode", "engine"),
            ("decode", "reference"), ("projection", "engine"), ("unet", "eager")} <= got
    decode = [r for r in rep["rows"] if r["stage"] == "decode" and "ms" in r]
    assert all(r["tokens_per_s"] > 0 and 0 < r["frac_of_floor"] for r in decode)
    # the compile baseline is reported as not measured (no CUDA), never silently dropped
    assert any(r["provider"] == "compile_static" and "error" in r for r in rep["rows"])
    md = (out / "report.md").read_text()
    assert "smoke run, not a performance claim" in md and "| decode | engine |" in md
    assert (out / "report.png").stat().st_size > 1000
    assert "frac_of_floor" in capsys.readouterr().out


def test_speedups_pair_engine_with_baselines():
    rows = [{"stage": "decode", "provider": "engine", "context": 128, "ms": 2.0},
            {"stage": "decode", "provider": "reference", "context": 128, "ms": 10.0},
            {"stage": "decode", "provider": "reference", "context": 1024, "ms": 99.0}]
    assert speedups(rows) == [{"stage": "decode", "context": 128, "baseline": "reference", "speedup": 5.0}]


def test_readme_results_section_is_generated_not_typed():
    """The README's results block equals what the generator makes from committed GPU reports."""
    text = (REPO / "README.md").read_text()
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    assert text[start:end] == readme_section(REPO), (
        "README results section is stale or hand-edited: run `python -m dreamllm_fast.bench.report --readme`")


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
