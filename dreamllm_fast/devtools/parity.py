"""Parity with a high-precision arbiter: is the engine's low-precision drift like the reference's?

Comparing two bf16 paths to each other measures the sum of two drifts. On an H100 at 7B shapes
(random weights, 300 random embeddings;
benchmarks/results/NVIDIA_H100_80GB_HBM3/2026-11-23_17f6485/arbiter.txt) the bf16 engine
was rel 0.362 from the bf16 reference, but rel 0.070 from the fp32 reference, where the bf16
reference itself was rel 0.368: the engine was the closer one. So every run here is compared to the
reference at a higher precision (the arbiter):

    arbiter(build, hi, lo, ...)  runs `reference@hi`, then `reference@lo` and `engine@lo`, one model
                                 alive at a time (7B: fp32 reference 27 GB, bf16 engine 13.5 GB);
                                 returns each low-precision run's drift from the arbiter.

One scenario per model (`run_scenario`): a prompt of embeddings -> last-token logits; then
teacher-forced decode steps on the ARBITER's greedy tokens (every run sees the same inputs, so one
early argmax flip cannot cascade); then a dream span (<dream_start> + queries) -> the projected
condition. `greedy` is the shared decode loop of the graph-vs-eager and token-equality tests; it
works on both backends. tests/parity/test_arbiter.py runs all of it on the CPU (tiny model) and
tests/parity/test_engine_gpu.py at 7B shapes on a GPU.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..engine.decode import EngineDecoder


@dataclass
class ScenarioResult:
    prefill: torch.Tensor  # fp32 logits [V] at the prompt's last position (on the CPU)
    decode: torch.Tensor  # fp32 logits [steps, V], after each teacher-forced token
    condition: torch.Tensor  # [Q, C] projected dream condition (fp32, on the CPU)
    tokens: list = field(default_factory=list)  # the tokens fed in decode (greedy if not forced)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b (fp64 on the CPU)."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


@contextlib.contextmanager
def graphs_disabled(model):
    """Run every engine step eagerly (same bucketed shapes) inside the block: graph == eager
    checks. A backend without graphs (the reference) runs as it is."""
    if not isinstance(getattr(model, "decoder", None), EngineDecoder):
        yield
        return
    saved, use = model.decoder.graphs, model.prefill.use_graphs
    model.decoder.graphs, model.prefill.use_graphs = None, False
    try:
        yield
    finally:
        model.decoder.graphs, model.prefill.use_graphs = saved, use


def _eager(model):
    return graphs_disabled(model)


@torch.no_grad()
def greedy(model, emb: torch.Tensor, steps: int, graphs: bool = True):
    """Greedy tokens and fp32 logits [steps, V] of `steps` decode steps after prompt `emb`, through
    one session of either backend; graphs=False runs the engine's captured steps eagerly."""
    with contextlib.nullcontext() if graphs else _eager(model):
        s = model.new_session()
        try:
            logits = s.extend(emb)
            toks, all_logits = [], []
            for _ in range(steps):
                toks.append(int(logits.argmax()))
                all_logits.append(logits.float())
                logits = s.extend(model.embed_tokens(toks[-1:]))
            return toks, torch.stack(all_logits)
        finally:
            s.close()


@torch.no_grad()
def run_scenario(model, emb: torch.Tensor, steps: int, dream_start: int,
                 tokens: Optional[list] = None) -> ScenarioResult:
    """Prompt -> logits; `steps` decode steps on `tokens` (greedy when None); dream span -> condition."""
    s = model.new_session()
    try:
        logits = s.extend(emb.to(model.dtype))
        prefill, decode, fed = logits.float().cpu(), [], []
        for i in range(steps):
            tok = int(logits.argmax()) if tokens is None else int(tokens[i])
            fed.append(tok)
            logits = s.extend(model.embed_tokens([tok]))
            decode.append(logits.float().cpu())
        Q = model.dream_queries.shape[0]
        span = torch.cat([model.embed_tokens([dream_start]), model.dream_queries])
        cond = s.extend_dream(span, list(range(1, Q + 1))).float().cpu()
    finally:
        s.close()
    return ScenarioResult(prefill, torch.stack(decode) if decode else torch.empty(0), cond, fed)


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def arbiter(build: Callable[[str, torch.dtype], object], hi: torch.dtype, lo: torch.dtype,
            emb: torch.Tensor, steps: int, dream_start: int, device="cpu",
            after_engine: Optional[Callable[[object], None]] = None) -> dict:
    """Drifts of `reference@lo` and `engine@lo` from the arbiter `reference@hi`.

    build(kind, dtype) makes a fresh "reference" or "engine" model; each is built, run and freed in
    turn. after_engine(model), if given, runs extra checks on the engine before it is freed.
    Returns {"reference": {...}, "engine": {...}} with the relative L2 drift of the prefill logits,
    the teacher-forced decode logits (all steps together, and the worst step) and the condition,
    plus "tokens" (the arbiter's greedy tokens) and "argmax" (each run's agreement with them).
    """
    m = build("reference", hi)
    top = run_scenario(m, emb, steps, dream_start)
    del m
    _free(device)
    out = {"tokens": top.tokens}
    for kind in ("reference", "engine"):
        m = build(kind, lo)
        r = run_scenario(m, emb, steps, dream_start, tokens=top.tokens)
        if kind == "engine" and after_engine is not None:
            after_engine(m)
        del m
        _free(device)
        out[kind] = {
            "prefill": rel(r.prefill, top.prefill),
            "decode": rel(r.decode, top.decode) if steps else 0.0,
            "decode_worst_step": max((rel(a, b) for a, b in zip(r.decode, top.decode)), default=0.0),
            "condition": rel(r.condition, top.condition),
            "argmax_agree": sum(int(a.argmax()) == t for a, t in zip([r.prefill, *r.decode[:-1]], top.tokens)),
        }
    return out


def format_drifts(d: dict) -> str:
    keys = ("prefill", "decode", "decode_worst_step", "condition")
    return "; ".join(f"{k}: engine {d['engine'][k]:.3g} vs reference {d['reference'][k]:.3g}" for k in keys)
