"""The load benchmark runs to completion on its own against a live server (a smoke test: it
asserts what the benchmark must report, never a time)."""
import json

import pytest

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
pytest.importorskip("httpx", reason="the serving tests need httpx")

from serving_helpers import LiveServer  # noqa: E402

from benchmarks import bench_serve  # noqa: E402
from dreamllm_fast.pipeline import DreamLLMPipeline  # noqa: E402
from dreamllm_fast.serving import (BatchedScheduler, SequentialScheduler, ServeConfig,  # noqa: E402
                                   create_app)


@pytest.mark.parametrize("scheduler", [SequentialScheduler, BatchedScheduler])
def test_bench_serve_reports_a_clean_run(scheduler, tiny_ckpt, tmp_path, capsys):
    pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", backend="engine",
                                            progress=False)
    sched = scheduler(pipe, warmup=False)
    with LiveServer(create_app(sched, ServeConfig(model_name="t", api_key="k"))) as srv:
        assert sched.wait_ready(60)
        rc = bench_serve.main(["--url", srv.url, "--api-key", "k", "--clients", "3", "--requests", "5",
                               "--max-tokens", "4", "--duration", "120", "--mix", "chat,vision,t2i",
                               "--steps", "1", "--out", str(tmp_path)])
    assert rc == 0
    rep = json.loads((tmp_path / "bench_serve.json").read_text())
    (row,) = rep["results"]
    assert row["scheduler"] == sched.name and row["requests"] == row["ok"] == 5 and row["errors"] == 0
    assert row["kv_slots_total"] == 2 and row["kv_slots_free_after"] == 2  # the engine's slots
    assert row["tokens"] == 4 * 4  # 4 chat/vision requests (t2i makes no tokens), 4 tokens each
    assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and row["latency_p50_s"] <= row["latency_p99_s"]
    assert f"| {sched.name} | 5 | 0 |" in capsys.readouterr().out


def test_percentile_is_nearest_rank():
    xs = list(range(1, 101))
    assert bench_serve._percentile(xs, 50) == 50 and bench_serve._percentile(xs, 99) == 99
    assert bench_serve._percentile([3.0], 99) == 3.0
