"""The decode loop's cost on the host, and decode tokens/s through the loop (bench stages).

- `measure_host_overhead`: the REAL pipeline (`DreamLLMPipeline.chat` / `.generate`, i.e. the decode
  loop, the incremental detokenizer, the stop rules, the dream branch's bookkeeping) over the stub
  backend (dreamllm_fast/devtools/stub.py), whose steps cost nothing, so what is timed is the pipeline's own
  work. Host microseconds per generated token at 250, 1,000 and 2,000 tokens, chat and interleaved;
  on the CPU and, when asked, on CUDA (the stub then does one device gather, a pinned copy and an
  event per step, as the engine does). Target (issue 12): <= 50 us per token, flat in length.
- `bench_decode_loop`: decode tokens/s of a backend through the loop, greedy and sampled, beside the
  forward-only figure (`session.extend` + argmax per token, the "decode" stage's method) measured in
  the same run: the loop with sampling should stay within 3% of it on a GPU.

Both are `dreamllm-fast bench` stages ("host", "decode_loop"); benchmarks/bench_host_overhead.py
runs the first on its own.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..sampling import SamplingParams

LENGTHS = (250, 1000, 2000)
WORDS = tuple(range(259, 384))  # the tiny tokenizer's merged pieces: the stub's walk
MSGS = [{"role": "user", "content": "Write a long illustrated story about a cat and a dog."}]
_TINY: dict = {}


def tiny_tokenizer_dir() -> Path:
    """A tiny checkpoint (for its real SentencePiece tokenizer), written once per process."""
    if "dir" not in _TINY:
        from ..tiny import make_tiny

        _TINY["dir"] = make_tiny(Path(tempfile.mkdtemp(prefix="dreamllm-host-")) / "tiny")
    return _TINY["dir"]


def stub_pipeline(device="cpu", dream_every: Optional[int] = None, tokenizer_dir=None,
                  max_positions: int = 8192):
    """`DreamLLMPipeline` over `StubModel` with the tiny checkpoint's tokenizer."""
    from ..checkpoint import load_tokenizer
    from ..config import DreamLLMConfig, SpecialTokens
    from ..pipeline import DreamLLMPipeline
    from .stub import StubModel

    tok = load_tokenizer(tokenizer_dir or tiny_tokenizer_dir())
    model = StubModel(DreamLLMConfig.from_name("tiny"), SpecialTokens.from_tokenizer(tok), WORDS,
                      device=device, max_positions=max_positions, dream_every=dream_every)
    return DreamLLMPipeline(model, tok, progress=False)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_host_overhead(device="cpu", lengths: Sequence[int] = LENGTHS, repeats: int = 7,
                          jobs: Sequence[str] = ("chat", "interleaved"), tokenizer_dir=None,
                          images: int = 3) -> list[dict]:
    """Rows of host microseconds per generated token (median of `repeats` calls, p20, p80).

    us_per_token: whole call / tokens (prefill, prompt and every per-call cost included);
    loop_us_per_token: the decode loop's share (`last_timings["decode"]`, which excludes the dream
    branch and the stubbed diffusion). Interleaved answers draw `images` images (1 DDPM step each),
    evenly spaced.
    """
    rows = []
    for job in jobs:
        for n in lengths:
            every = max(2, n // (images + 1)) if job == "interleaved" else None
            pipe = stub_pipeline(device, dream_every=every, tokenizer_dir=tokenizer_dir)

            def call():
                if job == "chat":
                    return pipe.chat(MSGS, max_new_tokens=n)
                return pipe.generate(MSGS, max_new_tokens=n, max_images=images, num_inference_steps=1)

            call()  # warm-up
            total, loop = [], []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                out = call()
                _sync(device)
                total.append((time.perf_counter() - t0) * 1e6 / n)
                loop.append(pipe.last_timings["decode"] * 1e6 / n)
            got = len(pipe.last_token_ids())
            assert got == n, f"stub walk ended early: {got} of {n} tokens"
            n_img = sum(not isinstance(x, str) for x in out) if job == "interleaved" else 0
            q = statistics.quantiles(total, n=5) if len(total) > 1 else [total[0]] * 4
            rows.append({"stage": "host", "provider": "pipeline_loop", "job": job, "device": str(device),
                         "tokens": n, "images": n_img, "us_per_token": statistics.median(total),
                         "us_per_token_p20": q[0], "us_per_token_p80": q[3],
                         "loop_us_per_token": statistics.median(loop),
                         "ms": statistics.median(total) * n / 1e3})
    by = {(r["job"], r["tokens"]): r["us_per_token"] for r in rows}
    for r in rows:  # flat in length: ratio to the shortest answer of the same job
        r["vs_shortest"] = r["us_per_token"] / by[(r["job"], min(lengths))]
    return rows


def bench_host_overhead(models: dict, s) -> list[dict]:
    """`dreamllm-fast bench` stage "host": on the bench's device (the models are not used)."""
    device = next(iter(models.values())).device if models else torch.device("cpu")
    lengths = tuple(s.extra.get("host_lengths", LENGTHS)) if getattr(s, "extra", None) else LENGTHS
    return measure_host_overhead(device, lengths)


# -- decode tokens/s through the loop --------------------------------------------------------
LOOP_MODES = {
    "greedy": SamplingParams(),
    "sample": SamplingParams(do_sample=True, temperature=0.8, top_p=0.95, top_k=50),
}


def _loop_tokens(m, tok, sess, sp, n: int, max_len: int) -> None:
    """n tokens through the loop: one 1-token extend (as forward-only's first step) + n - 1 steps.
    The budget ends the answer, so run-ahead launches no step past it."""
    from ..decoding import DecodeLoop

    loop = DecodeLoop(m, tok, max_len)
    logits = sess.extend(m.embed_tokens([5]))
    seq = loop.add(sess, logits, dataclasses.replace(sp, max_new_tokens=n), seed=1234)
    while not seq.finished:
        loop.step()
    loop.close()


def bench_decode_loop(models: dict, s) -> list[dict]:
    """Stage "decode_loop": per backend and context, tokens/s of `s.decode_tokens` tokens through
    the decode loop (greedy and sampled) and of forward-only steps, in the same run."""
    from ..bench.harness import do_bench
    from ..checkpoint import load_tokenizer

    tok = (s.extra or {}).get("tokenizer") if getattr(s, "extra", None) else None
    tok = tok or load_tokenizer(tiny_tokenizer_dir())  # ids past its vocabulary decode to ""
    rows = []
    for name, m in models.items():
        for ctx in s.contexts:
            sess = m.new_session()
            try:
                g = torch.Generator(m.device).manual_seed(0)
                sess.extend(m.embed_tokens(torch.randint(3, 300, (ctx,), generator=g, device=m.device)))
                start = sess.length
                n = s.decode_tokens
                max_len = start + 2 * n + 8

                def rewind():
                    sess.truncate(start)

                def forward_only():
                    rewind()
                    tok_id = torch.tensor([5], device=m.device)
                    for _ in range(n):
                        tok_id = sess.extend(m.embed_tokens(tok_id)).argmax().view(1)

                timings = {"forward_only": forward_only}
                for mode, sp in LOOP_MODES.items():
                    timings[f"loop_{mode}"] = (lambda sp=sp: (rewind(), _loop_tokens(m, tok, sess, sp, n, max_len)))
                base = None
                for mode, fn in timings.items():
                    try:
                        med, p20, p80 = do_bench(fn)
                    except Exception as e:
                        rows.append({"stage": "decode_loop", "provider": name, "mode": mode, "context": ctx,
                                     "error": f"{type(e).__name__}: {e}"[:300]})
                        continue
                    tps = n / (med * 1e-3)
                    base = tps if mode == "forward_only" else base
                    rows.append({"stage": "decode_loop", "provider": name, "mode": mode, "context": ctx,
                                 "tokens": n, "ms": med, "ms_p20": p20, "ms_p80": p80, "tokens_per_s": tps,
                                 "vs_forward_only": tps / base if base else None})
            finally:
                sess.close()
    return rows
