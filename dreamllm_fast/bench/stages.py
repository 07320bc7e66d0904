"""The stages `dreamllm-fast bench` measures, each beside its baselines in the same process.

Every stage returns rows ``{stage, provider, ms, ms_p20, ms_p80, floor_ms, frac_of_floor, ...}``.
Providers: ``engine`` (ours), ``reference`` (transformers + diffusers eager, the pipeline the
original composes) and, on CUDA, ``compile_static`` (transformers' LLaMA with a static cache under
torch.compile, the usual way to make HF decoding fast). Floors come from the measured ceilings:
weight + KV bytes over copy bandwidth for decode, FLOPs (counted by torch's FlopCounterMode) over
the GEMM rate for compute-bound stages.

Stages work on the backend interface (sessions of embeddings), not on the tokenizer, so random
weights at the real shapes measure the same work as a checkpoint: the interleaved stage runs the
exact schedule the pipeline runs (text tokens, a dream branch, an image, its feedback span).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..diffusion import decode_latents, denoise, make_scheduler
from .harness import ceilings, do_bench

STAGES = ("vision", "prefill", "decode", "dream", "projection", "unet", "vae", "t2i", "interleaved",
          "host", "decode_loop")


@dataclass
class BenchSettings:
    contexts: tuple[int, ...] = (128, 1024)
    decode_tokens: int = 32
    prefill_text_tokens: int = 512
    t2i_steps: int = 50
    interleaved_tokens: int = 300
    interleaved_images: int = 2
    unet_backends: tuple[str, ...] = ("eager", "compiled")
    stages: tuple[str, ...] = STAGES
    extra: dict = field(default_factory=dict)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gemm_rate() -> float:
    c = ceilings()
    return (c.get("bf16_gemm_tflops") or c.get("fp32_gemm_tflops_cpu")) * 1e12


def count_flops(fn: Callable[[], object]) -> Optional[float]:
    """FLOPs of one call (matmuls and convolutions, as torch counts them); None if it fails."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())
    except Exception:
        return None


def _row(stage: str, provider: str, fn, device, floor_ms: Optional[float] = None, **fields) -> dict:
    try:
        fn()
        _sync(device)
        med, p20, p80 = do_bench(fn)
    except Exception as e:  # a baseline that cannot run must not end the report
        return {"stage": stage, "provider": provider, "error": f"{type(e).__name__}: {e}"[:300], **fields}
    row = {"stage": stage, "provider": provider, "ms": med, "ms_p20": p20, "ms_p80": p80, **fields}
    if floor_ms:
        row["floor_ms"] = floor_ms
        row["frac_of_floor"] = floor_ms / med
    return row


def _weight_bytes(model) -> int:
    """Bytes one decode step must read: every LLM weight but the gathered embedding table."""
    c = model.config.llm
    per_layer = (4 * c.hidden_size * c.hidden_size * (1 + c.num_key_value_heads / c.num_attention_heads) / 2
                 + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)
    total = c.num_hidden_layers * per_layer + c.hidden_size * (c.vocab_size + 1)
    return int(total * torch.finfo(model.dtype).bits // 8)


def _kv_bytes_per_token(model) -> int:
    c = model.config.llm
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.finfo(model.dtype).bits // 8


def _embeds(model, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(model.device).manual_seed(seed)
    ids = torch.randint(3, 300, (n,), generator=g, device=model.device)
    return model.embed_tokens(ids)


# ---------------------------------------------------------------------------------------------
def bench_vision(models: dict, s: BenchSettings) -> list[dict]:
    rows = []
    for name, m in models.items():
        size = m.config.vision.image_size
        px = torch.randn(1, 3, size, size, device=m.device)
        flops = count_flops(lambda: m.encode_images(px))
        floor = flops / _gemm_rate() * 1e3 if flops else None
        rows.append(_row("vision", name, lambda: m.encode_images(px), m.device, floor, tokens=1))
    return rows


def bench_prefill(models: dict, s: BenchSettings) -> list[dict]:
    """Time to first token: one image span + text, prefilled from an empty cache."""
    rows = []
    for name, m in models.items():
        P = m.config.vision.num_patches
        emb = _embeds(m, s.prefill_text_tokens + P + 2)

        def run():
            sess = m.new_session()
            try:
                return sess.extend(emb).argmax()
            finally:
                sess.close()

        params = sum(v.numel() for k, v in _llm_params(m).items() if "embed_tokens" not in k)
        floor = 2 * params * emb.shape[0] / _gemm_rate() * 1e3
        rows.append(_row("prefill", name, run, m.device, floor, tokens=emb.shape[0]))
    return rows


def _llm_params(m) -> dict:
    llm = getattr(m, "llm", None)
    if isinstance(llm, torch.nn.Module):
        return dict(llm.named_parameters())
    c = m.config.llm  # the engine keeps raw tensors: count from the config
    from ..checkpoint import llm_expected_shapes

    return {k: torch.empty(sh, device="meta") for k, sh in llm_expected_shapes(c).items()}


def bench_decode(models: dict, s: BenchSettings) -> list[dict]:
    """Steady-state decode at each context: greedy tokens, one forward each, logits included."""
    rows = []
    for name, m in models.items():
        for ctx in s.contexts:
            sess = m.new_session()
            try:
                sess.extend(_embeds(m, ctx))
                start = sess.length
                tok = [torch.tensor(5, device=m.device)]

                def run():
                    if sess.length + s.decode_tokens > start + 4 * s.decode_tokens:
                        _rewind(sess, start)
                    for _ in range(s.decode_tokens):
                        tok[0] = sess.extend(m.embed_tokens(tok[0].view(1))).argmax()

                floor = (_weight_bytes(m) + _kv_bytes_per_token(m) * ctx) / (ceilings()["copy_gbps"] * 1e9) * 1e3
                row = _row("decode", name, run, m.device, floor * s.decode_tokens, context=ctx,
                           tokens=s.decode_tokens)
                if "ms" in row:
                    row["tokens_per_s"] = s.decode_tokens / (row["ms"] * 1e-3)
                rows.append(row)
            finally:
                sess.close()
    return rows


def _rewind(sess, length: int) -> None:
    """Drop cached positions past `length` (both backends keep the prefix intact)."""
    if hasattr(sess, "truncate"):
        sess.truncate(length)
    elif hasattr(sess, "cache") and sess.cache is not None:  # transformers DynamicCache
        # Slice each layer directly: `crop`'s argument changed meaning within transformers 5.x.
        for layer in sess.cache.layers:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
        sess.length = length
    else:
        sess.length = length


def bench_dream(models: dict, s: BenchSettings) -> list[dict]:
    """The dream branch: `<dream_start>` + Q queries appended to a 512-token context."""
    rows = []
    for name, m in models.items():
        Q = m.dream_queries.shape[0]
        sess = m.new_session()
        try:
            sess.extend(_embeds(m, 512))
            emb = torch.cat([m.embed_tokens([m.special.dream_start]), m.dream_queries])

            def run():
                _rewind(sess, 512)
                return sess.extend_dream(emb, list(range(1, Q + 1)))

            floor = (_weight_bytes(m) + _kv_bytes_per_token(m) * 600) / (ceilings()["copy_gbps"] * 1e9) * 1e3
            rows.append(_row("dream", name, run, m.device, floor, tokens=Q + 1))
        finally:
            sess.close()
    return rows


def bench_projection(models: dict, s: BenchSettings) -> list[dict]:
    """Gather Q rows + final RMSNorm + bias-free projection: the fused kernel vs torch."""
    from .. import kernels

    m = next(iter(models.values()))
    c = m.config
    H, C, Q = c.llm.hidden_size, c.diffusion.cross_attention_dim, c.num_dream_queries
    hidden = torch.randn(Q + 600, H, device=m.device, dtype=m.dtype)
    rows_idx = torch.arange(600, 600 + Q, device=m.device)
    nw = torch.ones(H, device=m.device, dtype=m.dtype)
    pw = torch.randn(C, H, device=m.device, dtype=m.dtype) * 0.02
    floor = pw.numel() * pw.element_size() / (ceilings()["copy_gbps"] * 1e9) * 1e3
    eps = c.llm.rms_norm_eps
    return [
        _row("projection", "engine", lambda: kernels.dream_projection(hidden, rows_idx, nw, pw, eps),
             m.device, floor),
        _row("projection", "reference",
             lambda: kernels.reference.dream_projection_ref(hidden, rows_idx, nw, pw, eps), m.device, floor),
    ]


def bench_unet(models: dict, s: BenchSettings) -> list[dict]:
    """One U-Net step at the guidance batch (2) and the default resolution, per backend."""
    from ..export.backends import make_unet_backend

    m = next(iter(models.values()))
    d = m.config.diffusion
    lat = d.default_resolution // d.vae_scale_factor
    x = torch.randn(2, d.latent_channels, lat, lat, device=m.device, dtype=m.dtype)
    t = torch.tensor([981.0, 981.0], device=m.device)
    ctx = torch.randn(2, m.config.num_dream_queries, d.cross_attention_dim, device=m.device, dtype=m.dtype)
    flops = count_flops(lambda: m.unet_eps(x, t, ctx))
    floor = flops / _gemm_rate() * 1e3 if flops else None
    rows = []
    for kind in s.unet_backends:
        try:
            fn = make_unet_backend(m.unet, kind, precision=m.dtype)
            name = fn.name
        except Exception as e:
            rows.append({"stage": "unet", "provider": kind, "error": str(e)[:300]})
            continue
        if name != kind:  # fell back: say so instead of timing eager twice
            rows.append({"stage": "unet", "provider": kind,
                         "error": f"unavailable here, fell back to {name}: {getattr(fn, 'fallback_reason', '')}"[:300]})
            continue
        rows.append(_row("unet", kind, lambda: fn(x, t, ctx), m.device, floor,
                         resolution=d.default_resolution, batch=2))
    return rows


def bench_vae(models: dict, s: BenchSettings) -> list[dict]:
    m = next(iter(models.values()))
    d = m.config.diffusion
    lat = d.default_resolution // d.vae_scale_factor
    z = torch.randn(1, d.latent_channels, lat, lat, device=m.device, dtype=m.dtype)
    flops = count_flops(lambda: m.vae_decode(z))
    floor = flops / _gemm_rate() * 1e3 if flops else None
    return [_row("vae", "eager", lambda: m.vae_decode(z), m.device, floor,
                 resolution=d.default_resolution)]


def _t2i(m, steps: int, prompt_len: int = 16):
    """Prompt -> condition (cond; uncond cached by the pipeline, so recomputed once here) -> image."""
    Q = m.dream_queries.shape[0]
    d = m.config.diffusion
    emb = torch.cat([_embeds(m, prompt_len), m.embed_tokens([m.special.dream_start]), m.dream_queries])
    sess = m.new_session()
    try:
        cond = sess.extend_dream(emb, list(range(prompt_len + 1, prompt_len + 1 + Q)))
    finally:
        sess.close()
    lat = d.default_resolution // d.vae_scale_factor
    g = torch.Generator(m.device).manual_seed(0)
    x = torch.randn(1, d.latent_channels, lat, lat, generator=g, device=m.device, dtype=m.dtype)
    x = denoise(m.unet_eps, make_scheduler(d.scheduler), cond[None], cond[None], 7.5, steps, x, g)
    return decode_latents(m.vae_decode, x, d.vae_scaling_factor)


def bench_t2i(models: dict, s: BenchSettings) -> list[dict]:
    return [_row("t2i", name, lambda m=m: _t2i(m, s.t2i_steps), m.device, None, steps=s.t2i_steps)
            for name, m in models.items()]


def _interleaved(m, tokens: int, images: int, steps: int):
    """The schedule of an interleaved answer: text, then per image the dream branch, the image,
    and its feedback span; tokens split evenly around the images."""
    Q = m.dream_queries.shape[0]
    sp = m.special
    sess = m.new_session()
    try:
        logits = sess.extend(_embeds(m, 64))
        per = tokens // (images + 1)
        for i in range(images + 1):
            for _ in range(per):
                logits = sess.extend(m.embed_tokens(logits.argmax().view(1)))
            if i == images:
                break
            sess.extend_dream(torch.cat([m.embed_tokens([sp.dream_start]), m.dream_queries]),
                              list(range(1, Q + 1)))
            img = _t2i(m, steps, prompt_len=4)
            size = m.config.vision.image_size
            px = torch.nn.functional.interpolate(img, size=(size, size), mode="bicubic")
            feats = m.encode_images(px)[0]
            logits = sess.extend(torch.cat([m.embed_tokens([sp.dream_end, sp.im_start]),
                                            feats.to(m.dtype), m.embed_tokens([sp.im_end])]))
        return logits
    finally:
        sess.close()


def bench_interleaved(models: dict, s: BenchSettings) -> list[dict]:
    return [_row("interleaved", name,
                 lambda m=m: _interleaved(m, s.interleaved_tokens, s.interleaved_images, s.t2i_steps),
                 m.device, None, tokens=s.interleaved_tokens, images=s.interleaved_images)
            for name, m in models.items()]


def bench_compile_static(ref_model, s: BenchSettings) -> list[dict]:
    """Baseline, gpt-fast style: transformers' LLaMA + StaticCache, the decode step under
    torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA only). Compile and capture time is
    reported separately (`compile_s`), never inside the timed steps."""
    import time

    if ref_model.device.type != "cuda":
        return [{"stage": "decode", "provider": "compile_static",
                 "error": "skipped: torch.compile + CUDA graphs baseline needs CUDA"}]
    from transformers import StaticCache

    llm = ref_model.llm
    table = llm.model.embed_tokens.weight
    rows = []
    for ctx in s.contexts:
        try:
            cache = StaticCache(config=llm.config, max_cache_len=ctx + 4 * s.decode_tokens + 8)

            def step(x, pos, cache_pos):
                return llm(inputs_embeds=x, position_ids=pos, cache_position=cache_pos,
                           past_key_values=cache, use_cache=True).logits[:, -1].float()

            compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
            pos0 = torch.arange(ctx, device="cuda")
            state = {"logits": step(_embeds(ref_model, ctx)[None], pos0[None], pos0), "pos": ctx}

            def run():
                if state["pos"] + s.decode_tokens > cache.max_cache_len:
                    state["pos"] = ctx  # rewind: later positions are overwritten, never read
                logits = state["logits"]
                for _ in range(s.decode_tokens):
                    p = torch.full((1,), state["pos"], device="cuda", dtype=torch.long)
                    logits = compiled(table[logits.argmax(-1)][:, None], p[None], p)
                    state["pos"] += 1
                state["logits"] = logits

            t0 = time.perf_counter()
            run()  # compile + capture
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            floor = (_weight_bytes(ref_model) + _kv_bytes_per_token(ref_model) * ctx) / (ceilings()["copy_gbps"] * 1e9) * 1e3
            row = _row("decode", "compile_static", run, ref_model.device, floor * s.decode_tokens,
                       context=ctx, tokens=s.decode_tokens, compile_s=compile_s)
        except Exception as e:
            row = {"stage": "decode", "provider": "compile_static", "context": ctx,
                   "error": f"{type(e).__name__}: {e}"[:300]}
        if "ms" in row:
            row["tokens_per_s"] = s.decode_tokens / (row["ms"] * 1e-3)
        rows.append(row)
    return rows


from ..host_overhead import bench_decode_loop, bench_host_overhead  # noqa: E402  (decode loop's stages)

RUNNERS = {"vision": bench_vision, "prefill": bench_prefill, "decode": bench_decode,
           "dream": bench_dream, "projection": bench_projection, "unet": bench_unet,
           "vae": bench_vae, "t2i": bench_t2i, "interleaved": bench_interleaved,
           "host": bench_host_overhead, "decode_loop": bench_decode_loop}
