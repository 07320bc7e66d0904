"""The host-overhead benchmark and the decode-loop bench stage: plumbing, not performance (no
timing assertions; benchmarks are not tests)."""
import torch

from dreamllm_fast.bench.stages import RUNNERS, STAGES, BenchSettings
from dreamllm_fast.devtools.host_overhead import bench_decode_loop, measure_host_overhead, stub_pipeline


def test_host_overhead_rows(tiny_ckpt):
    rows = measure_host_overhead("cpu", lengths=(40, 80), repeats=2, tokenizer_dir=tiny_ckpt, images=1)
    assert [(r["job"], r["tokens"]) for r in rows] == [("chat", 40), ("chat", 80), ("interleaved", 40),
                                                        ("interleaved", 80)]
    for r in rows:
        assert r["us_per_token"] > 0 and r["loop_us_per_token"] > 0 and r["vs_shortest"] > 0
        assert r["images"] == (1 if r["job"] == "interleaved" else 0)


def test_stub_pipeline_runs_the_real_loop_with_no_wasted_step(tiny_ckpt):
    pipe = stub_pipeline(tokenizer_dir=tiny_ckpt)
    text = pipe.chat([{"role": "user", "content": "hi"}], max_new_tokens=300)
    ids = pipe.last_token_ids()
    assert len(ids) == 300 and text == pipe.tokenizer.decode(ids, skip_special_tokens=True)
    assert pipe.model.launches == 299, "run-ahead must not launch a step past the budget"


def test_stages_registered_and_decode_loop_rows(tiny_ckpt):
    assert {"host", "decode_loop"} <= set(STAGES) and RUNNERS["decode_loop"] is bench_decode_loop
    from dreamllm_fast.checkpoint import load_checkpoint, load_tokenizer
    from dreamllm_fast.config import SpecialTokens
    from dreamllm_fast.engine import EngineModel

    ck = load_checkpoint(tiny_ckpt)
    tok = load_tokenizer(tiny_ckpt)
    eng = EngineModel(ck, SpecialTokens.from_tokenizer(tok), "cpu", torch.float32)
    s = BenchSettings(contexts=(16,), decode_tokens=6, extra={"tokenizer": tok})
    rows = bench_decode_loop({"engine": eng}, s)
    assert [r["mode"] for r in rows] == ["forward_only", "loop_greedy", "loop_sample"]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows), rows
    assert rows[0]["vs_forward_only"] == 1.0
    assert sorted(eng._free) == list(range(eng.engine_config.max_batch)), "sessions released"
