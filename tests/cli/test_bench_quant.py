"""`dreamllm-fast bench --weights int8 fp8` on the CPU with the tiny preset: the quantized engines
as providers beside the bf16 engine, each with its own floor (plumbing, not performance)."""
import json

from dreamllm_fast.bench.report import speedups
from dreamllm_fast.cli import main


def test_bench_rows_for_the_quantized_engines(tmp_path):
    out = tmp_path / "r"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--backends", "engine",
                 "--weights", "bf16", "int8", "fp8", "--stages", "prefill", "decode", "dream",
                 "--contexts", "16", "--decode-tokens", "2",
                 "--no-compile-baseline"]) == 0
    rep = json.loads((out / "report.json").read_text())
    rows = [r for r in rep["rows"] if "ms" in r]
    assert rep["meta"]["weights"] == ["bf16", "int8", "fp8"] and not any("error" in r for r in rep["rows"])
    got = {(r["stage"], r["provider"]) for r in rows}
    for stage in ("prefill", "decode", "dream"):
        assert {(stage, "engine"), (stage, "engine-int8"), (stage, "engine-fp8")} <= got
    dec = {(r["provider"], r["context"]): r for r in rows if r["stage"] == "decode"}
    for ctx in (16,):
        # each engine's floor is the bytes it reads: fp32 weights here vs 1 byte + scales
        assert dec[("engine-int8", ctx)]["floor_ms"] < 0.4 * dec[("engine", ctx)]["floor_ms"]
        assert dec[("engine-int8", ctx)]["floor_ms"] == dec[("engine-fp8", ctx)]["floor_ms"]
        assert dec[("engine-int8", ctx)]["tokens_per_s"] > 0
    pairs = {(x["stage"], x["provider"], x["baseline"]) for x in speedups(rep["rows"])}
    assert ("decode", "engine-int8", "engine") in pairs and ("dream", "engine-fp8", "engine") in pairs
