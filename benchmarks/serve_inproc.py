"""The batched scheduler under load, in process (no HTTP): aggregate tokens/s and TTFT at 1, 4 and
16 concurrent requests.

    python -m benchmarks.serve_inproc --out rows.json [--preset dreamllm-7b|tiny] [--device cuda]
        [--concurrency 1 4 16] [--max-tokens 128]

The `BatchedScheduler` of `dreamllm-fast serve` (serving/batched.py) owns an engine pipeline with
random weights at the preset's shapes (timing depends on shapes, not values) and the tiny
checkpoint's tokenizer standing in (its ids are valid in any vocabulary). Each level submits N
chat requests at once, greedy, `--max-tokens` tokens each, after one warm-up request: tokens/s is
the completion tokens of all N over the wall time from the first submit to the last request's
end; TTFT is submit to the first text event of each request (what a client would see, after the
detokenizer). So that every request runs its full length, the random LM head never picks a stop
token nor an id the stand-in tokenizer cannot decode: those rows of its weight are zero, so their
logit is 0 against the maximum of thousands of random logits (positive in practice); completion
tokens are counted from the scheduler's own `ChoiceDone` events, not assumed.

Rows (stage "serve", one per concurrency) are written to --out after every level, so a run killed
by its phase timeout keeps the levels it finished. Rows carry no "ms" field: they are not bench
stages. Not a test: nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

PROMPT = "Please describe, in some detail, a small house by a lake in the morning light."


def _percentile(xs: list, q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def silence(head, vocab: int, stop_ids) -> None:
    """Zero the LM-head rows [V, H] of the stop tokens and of ids >= `vocab`, in place."""
    head[vocab:] = 0
    head[list(stop_ids)] = 0


def build_pipeline(preset: str, device, dtype, max_batch: int, max_seq=None):
    """An engine `DreamLLMPipeline` on random weights (or the tiny checkpoint) whose LM head never
    chooses a stop token (module docstring)."""
    import dataclasses

    import torch

    from dreamllm_fast.bench.models import _tiny_dir
    from dreamllm_fast.checkpoint import load_checkpoint, load_tokenizer
    from dreamllm_fast.config import DreamLLMConfig, SpecialTokens
    from dreamllm_fast.engine import EngineModel
    from dreamllm_fast.devtools.testing import random_checkpoint
    from dreamllm_fast.pipeline import DreamLLMPipeline
    from dreamllm_fast.serving import serving_engine_config

    tiny = _tiny_dir()
    tok = load_tokenizer(tiny)
    special = SpecialTokens.from_tokenizer(tok)
    if preset == "tiny":
        ckpt = load_checkpoint(tiny)
    else:
        ckpt = random_checkpoint(DreamLLMConfig.from_name(preset), device=device, dtype=dtype)
    silence(ckpt.llm["lm_head.weight"], len(tok), (special.eos, special.bos, special.dream_start))
    cfg = serving_engine_config(max_batch, device, dtype)  # KV slots: 1 GiB each at 7B, 2048 ctx
    if max_seq is not None:
        cfg = dataclasses.replace(cfg, max_seq=max_seq)
    model = EngineModel(ckpt, special, device=torch.device(device), dtype=dtype, engine_config=cfg)
    return DreamLLMPipeline(model, tok, progress=False)


async def _one(sched, i: int, max_tokens: int) -> dict:
    from dreamllm_fast.sampling import SamplingParams
    from dreamllm_fast.serving import ChoiceDone, GenerationRequest, RequestFailed, TextDelta

    req = GenerationRequest(kind="chat", seeds=[i], messages=[{"role": "user", "content": PROMPT}],
                            max_new_tokens=max_tokens, sampling=SamplingParams(max_new_tokens=max_tokens))
    t0 = time.perf_counter()
    h = await sched.submit(req)
    res = {"ttft_s": None, "tokens": 0, "error": None}
    async for ev in h:
        if isinstance(ev, TextDelta) and res["ttft_s"] is None:
            res["ttft_s"] = time.perf_counter() - t0
        elif isinstance(ev, ChoiceDone):
            res["tokens"] += ev.completion_tokens
        elif isinstance(ev, RequestFailed):
            res["error"] = f"{type(ev.error).__name__}: {ev.error}"[:300]
    res["latency_s"] = time.perf_counter() - t0
    return res


async def _level(sched, n: int, max_tokens: int, base: int) -> dict:
    t0 = time.perf_counter()
    res = await asyncio.gather(*(_one(sched, base + i, max_tokens) for i in range(n)))
    wall = time.perf_counter() - t0
    ok = [r for r in res if r["error"] is None]
    ttft = [r["ttft_s"] * 1e3 for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    row = {"stage": "serve", "provider": "batched", "concurrency": n, "max_tokens": max_tokens,
           "requests_ok": len(ok), "completion_tokens": tokens, "wall_s": wall,
           "tokens_per_s": tokens / wall}
    if ttft:
        row.update(ttft_p50_ms=_percentile(ttft, 50), ttft_p99_ms=_percentile(ttft, 99))
    errors = [r["error"] for r in res if r["error"]]
    if errors:
        row["errors"] = errors[:3]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="rows JSON, rewritten after every level")
    p.add_argument("--preset", default=None, choices=("dreamllm-7b", "tiny"),
                   help="default: dreamllm-7b on CUDA, tiny elsewhere")
    p.add_argument("--device", default=None)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-seq", type=int, default=None,
                   help="KV slot length (default: the model's context, as `dreamllm-fast serve`)")
    args = p.parse_args(argv)
    import torch

    from dreamllm_fast.serving import BatchedScheduler

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("dreamllm-7b" if device.startswith("cuda") else "tiny")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    rows: list[dict] = []

    def write():
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, args.out)

    t0 = time.perf_counter()
    most = max(args.concurrency)
    sched = BatchedScheduler(lambda: build_pipeline(preset, device, dtype, most, args.max_seq),
                             max_batch=most, max_queue=4 * most)
    sched.start()
    if not sched.wait_ready(None):
        rows.append({"stage": "serve", "provider": "batched", "error": f"not ready: {sched.health().detail}"})
        write()
        return 1
    load_s = time.perf_counter() - t0
    print(f"scheduler ready in {load_s:.1f} s ({preset} on {device})", flush=True)
    try:
        asyncio.run(_level(sched, 1, min(8, args.max_tokens), 10_000))  # warm-up, not reported
        for i, n in enumerate(args.concurrency):
            row = asyncio.run(_level(sched, n, args.max_tokens, 100 * i))
            row.update(preset=preset, device=device, load_s=load_s)
            rows.append(row)
            write()
            print(json.dumps(row), flush=True)
    finally:
        sched.shutdown()
    return 0 if all(r.get("requests_ok") == r.get("concurrency") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
