"""Baselines that run in a child process (isolated.py): torch.compile + CUDA graphs can hit a
device-side assert, which poisons the CUDA context of the whole process (on the H100 on
2026-11-23 one such assert in the compile+StaticCache baseline lost the whole bench report).

- ``compile_static``: transformers' LLaMA + ``StaticCache`` with the decode step under
  ``torch.compile(mode="reduce-overhead", fullgraph=True)``, gpt-fast style, the usual way to make
  HF decoding fast. Each timed run starts from a reset cache re-prefilled outside the timed region:
  a transformers ``StaticLayer`` writes at its own ``cumulative_length`` counter (read in the 5.17
  and 5.23 sources: ``LlamaModel.forward`` takes no ``cache_position`` there, and ``reset()``
  zeroes K/V and the counter in place), so "rewinding" by passing earlier positions writes past
  the end (the H100's ``index out of bounds: 0 <= tmp31 < 40``). ``cudagraph_mark_step_begin()`` precedes
  every compiled call, as reduce-overhead's graph trees require when a step's output feeds the next.
- ``diffusion_backend``: one U-Net or VAE export backend (``compiled``: torch.compile or AOTI,
  ``onnxruntime``, ``tensorrt``), built strictly (a fallback is reported, never timed as eager).

Compile (first call) and warm-up (second call) times are reported apart from the timed runs.
"""
from __future__ import annotations

import inspect
import time
from typing import Callable

import torch

from .harness import bench_fn, bench_with_setup
from .stages import decode_floor_ms, error_row


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StaticCacheDecoder:
    """Greedy decode of `tokens` steps after a `ctx`-token prefill, over one StaticCache.

    prefill() resets the cache and refills it (never a rewind); decode() returns the tokens [n]
    as a device tensor without a host sync inside the loop (and leaves the last step's logits in
    `last_logits`).
    """

    def __init__(self, ref_model, ctx: int, tokens: int, compile: bool = True, seed: int = 0):
        from transformers import StaticCache

        from ..reference.model import cache_kwargs
        from .stages import _embeds

        self.llm = llm = ref_model.llm
        self.n = tokens
        self.table = llm.model.embed_tokens.weight
        self.emb = _embeds(ref_model, ctx, seed)[None]  # [1, ctx, H]
        dev = ref_model.device
        self.prompt_pos = torch.arange(ctx, device=dev)[None]  # [1, ctx]
        self.step_pos = torch.arange(ctx, ctx + tokens, device=dev)  # [n]
        self.cache = StaticCache(config=llm.config, max_cache_len=-(-(ctx + tokens) // 8) * 8)
        # Neither 5.17 nor 5.23 LLaMA takes cache_position (the layer counts itself); pass it only
        # to a version whose forward names it, so the write position never disagrees with ours.
        self._pass_cache_pos = "cache_position" in inspect.signature(llm.model.forward).parameters
        self._cache_kw = cache_kwargs(llm, self.cache)  # read off the signature here, not in the graph
        self.step = (torch.compile(self._step, mode="reduce-overhead", fullgraph=True) if compile
                     else self._step)
        self.logits = None

    def _forward(self, x, pos):  # x [1, n, H], pos [1, n]
        kw = {"cache_position": pos[0]} if self._pass_cache_pos else {}
        return self.llm(inputs_embeds=x, position_ids=pos, use_cache=True, logits_to_keep=1,
                        **self._cache_kw, **kw).logits[:, -1].float()  # [1, V]

    def _step(self, x, pos):
        return self._forward(x, pos)

    @torch.no_grad()
    def prefill(self):
        self.cache.reset()  # zero K/V and the layers' cumulative_length, in place (static addresses)
        self.logits = self._forward(self.emb, self.prompt_pos)

    @torch.no_grad()
    def decode(self) -> torch.Tensor:
        tok = self.logits.argmax(-1)  # [1]
        toks = []
        for i in range(self.n):
            toks.append(tok)
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are dead
            logits = self.step(self.table[tok][:, None], self.step_pos[i:i + 1][None])
            tok = logits.argmax(-1)  # a fresh tensor: safe after the next replay
        self.last_logits = logits  # [1, V], valid until the next compiled call
        return torch.cat(toks)


def compile_static_rows(ref_model, contexts, decode_tokens: int, emit: Callable[[dict], None],
                        compile: bool = True, reps: int = 5) -> None:
    """One decode row per context (or its error row), each passed to `emit` as soon as it exists."""
    for ctx in contexts:
        try:
            dec = StaticCacheDecoder(ref_model, ctx, decode_tokens, compile=compile)
            t = []
            for _ in range(2):  # 1st: compile + record; 2nd: warm-up replay path
                dec.prefill()
                _sync()
                t0 = time.perf_counter()
                dec.decode()
                _sync()
                t.append(time.perf_counter() - t0)
            med, p20, p80 = bench_with_setup(dec.prefill, dec.decode, reps)
            floor = decode_floor_ms(ref_model, ctx, decode_tokens)
            emit({"stage": "decode", "provider": "compile_static", "ms": med, "ms_p20": p20,
                  "ms_p80": p80, "context": ctx, "tokens": decode_tokens, "compile_s": t[0],
                  "warmup_s": t[1], "floor_ms": floor, "frac_of_floor": floor / med,
                  "tokens_per_s": decode_tokens / (med * 1e-3), "isolated": True})
        except Exception as e:
            emit(error_row("decode", "compile_static", e, context=ctx, isolated=True))
        finally:
            dec = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# -------------------------------------------------------------------- jobs (run in a child)
def _setup(spec: dict):
    from ..config import Precision
    from . import harness

    harness._CEILINGS.update(spec.get("ceilings") or {})  # the parent's, measured once
    return torch.device(spec["device"]), Precision.parse(spec["dtype"]).dtype


def compile_static_job(spec: dict, emit: Callable[[dict], None]) -> None:
    from .models import build_models

    device, dtype = _setup(spec)
    ref = build_models(["reference"], spec.get("preset"), spec.get("checkpoint"), device, dtype)["reference"]
    s = spec["settings"]
    compile_static_rows(ref, s["contexts"], s["decode_tokens"], emit,
                        compile=spec.get("options", {}).get("compile", True))


def diffusion_backend_job(spec: dict, emit: Callable[[dict], None]) -> None:
    """options: component ("unet" | "vae"), kind, autotune, floor_ms."""
    from ..export.backends import make_unet_backend, make_vae_backend
    from .models import DiffusionModels
    from .stages import unet_inputs, vae_inputs

    device, dtype = _setup(spec)
    o = spec["options"]
    comp, kind = o["component"], o["kind"]
    m = DiffusionModels(spec.get("preset"), spec.get("checkpoint"), device, dtype)
    make = make_unet_backend if comp == "unet" else make_vae_backend
    module = m.unet if comp == "unet" else m.vae
    extra = {"compile": "aoti"} if kind == "compiled-aoti" else {}
    t0 = time.perf_counter()
    fn = make(module, "compiled" if kind == "compiled-aoti" else kind, precision=dtype, strict=True,
              cfg=m.config, autotune=o.get("autotune", False), **extra)
    build_s = time.perf_counter() - t0
    args = unet_inputs(m) if comp == "unet" else vae_inputs(m)
    t0 = time.perf_counter()
    fn(*args)  # compile / capture
    _sync()
    compile_s = time.perf_counter() - t0
    med, p20, p80, warmup_s = bench_fn(lambda: fn(*args))
    row = {"stage": comp, "provider": kind, "ms": med, "ms_p20": p20, "ms_p80": p80,
           "build_s": build_s, "compile_s": compile_s, "warmup_s": warmup_s,
           "autotune": bool(o.get("autotune")), "resolution": m.config.diffusion.default_resolution,
           "isolated": True}
    if o.get("floor_ms"):
        row["floor_ms"] = o["floor_ms"]
        row["frac_of_floor"] = o["floor_ms"] / med
    emit(row)
