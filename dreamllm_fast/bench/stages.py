"""The stages `dreamllm-fast bench` measures, each beside its baselines in the same run.

Every stage returns rows ``{stage, provider, ms, ms_p20, ms_p80, floor_ms, frac_of_floor, ...}``.
Providers: ``engine`` (ours, its CUDA-graph path where it has one), ``engine_eager`` (the same
engine with ``EngineConfig(use_cuda_graphs=False)``, for the stages where the two differ:
prefill, decode, dream), ``reference`` (transformers + diffusers eager, the pipeline the original
composes). Baselines that can poison the CUDA context (torch.compile + CUDA graphs) are not here:
baselines.py runs them in a child process. Floors come from the measured ceilings: weight + KV
bytes over copy bandwidth for decode, FLOPs (torch's FlopCounterMode) over the GEMM rate for the
compute-bound stages.

Isolation: a provider that fails (setup or timing) becomes an error row with its type, message and
where it was raised; the other providers and stages go on.

Stages work on the backend interface (sessions of embeddings), not on the tokenizer, so random
weights at the real shapes measure the same work as a checkpoint: the interleaved stage runs the
exact schedule the pipeline runs (text tokens, a dream branch, an image, its feedback span).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..diffusion import decode_latents, denoise, make_noise_scheduler
from . import GRAPH_STAGES, LLM_STAGES, QUANT_STAGES, STAGES  # noqa: F401 (re-exported)
from .harness import bench_fn, ceilings



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


def error_row(stage: str, provider: str, exc: BaseException, **fields) -> dict:
    """A row that says what failed: exception type, message, and the innermost frame."""
    where = None
    tb = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    if tb:
        f = tb[-1]
        where = f"{Path(f.filename).name}:{f.lineno} in {f.name}"
    return {"stage": stage, "provider": provider, "error": f"{type(exc).__name__}: {exc}"[:300],
            "error_type": type(exc).__name__, "where": where, **fields}


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
        med, p20, p80, first_s = bench_fn(fn)
    except Exception as e:  # a provider that cannot run must not end the report
        return error_row(stage, provider, e, **fields)
    row = {"stage": stage, "provider": provider, "ms": med, "ms_p20": p20, "ms_p80": p80,
           "first_call_s": first_s, **fields}
    if floor_ms:
        row["floor_ms"] = floor_ms
        row["frac_of_floor"] = floor_ms / med
    return row


def models_for(stage: str, models: dict) -> dict:
    """The providers a stage compares: engine_eager only where it differs from engine, the
    quantized engines (engine-int8, engine-fp8) on QUANT_STAGES."""
    return {k: m for k, m in models.items() if (k != "engine_eager" or stage in GRAPH_STAGES)
            and (not k.startswith("engine-") or stage in QUANT_STAGES)}


def _each(stage: str, models: dict, body: Callable) -> list[dict]:
    """body(name, model) -> rows, per provider; a setup failure becomes that provider's error row."""
    rows = []
    for name, m in models_for(stage, models).items():
        try:
            rows += body(name, m)
        except Exception as e:
            rows.append(error_row(stage, name, e))
    return rows


def _weight_bytes(model) -> int:
    """Bytes one decode step must read: every LLM weight but the gathered embedding table (a
    quantized engine: the bytes its weights, scales and norms really occupy)."""
    from ..engine import EngineModel

    if isinstance(model, EngineModel) and model.engine_config.weights.quantized:
        return model.weights.decode_read_bytes()
    c = model.config.llm
    per_layer = (4 * c.hidden_size * c.hidden_size * (1 + c.num_key_value_heads / c.num_attention_heads) / 2
                 + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)
    total = c.num_hidden_layers * per_layer + c.hidden_size * (c.vocab_size + 1)
    return int(total * torch.finfo(model.dtype).bits // 8)


def _kv_bytes_per_token(model) -> int:
    c = model.config.llm
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.finfo(model.dtype).bits // 8


def decode_floor_ms(model, ctx: int, tokens: int) -> float:
    """Weight + KV bytes of `tokens` decode steps at context `ctx` over the copy bandwidth."""
    per = (_weight_bytes(model) + _kv_bytes_per_token(model) * ctx) / (ceilings()["copy_gbps"] * 1e9)
    return per * 1e3 * tokens


def _embeds(model, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(model.device).manual_seed(seed)
    ids = torch.randint(3, 300, (n,), generator=g, device=model.device)
    return model.embed_tokens(ids)


# ---------------------------------------------------------------------------------------------
def bench_vision(models: dict, s: BenchSettings) -> list[dict]:
    def body(name, m):
        size = m.config.vision.image_size
        px = torch.randn(1, 3, size, size, device=m.device)
        flops = count_flops(lambda: m.encode_images(px))
        floor = flops / _gemm_rate() * 1e3 if flops else None
        return [_row("vision", name, lambda: m.encode_images(px), m.device, floor, tokens=1)]
    return _each("vision", models, body)


def bench_prefill(models: dict, s: BenchSettings) -> list[dict]:
    """Time to first token: one image span + text, prefilled from an empty cache."""
    def body(name, m):
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
        return [_row("prefill", name, run, m.device, floor, tokens=emb.shape[0])]
    return _each("prefill", models, body)


def _llm_params(m) -> dict:
    llm = getattr(m, "llm", None)
    if isinstance(llm, torch.nn.Module):
        return dict(llm.named_parameters())
    c = m.config.llm  # the engine keeps raw tensors: count from the config
    from ..checkpoint import llm_expected_shapes

    return {k: torch.empty(sh, device="meta") for k, sh in llm_expected_shapes(c).items()}


def bench_decode(models: dict, s: BenchSettings) -> list[dict]:
    """Steady-state decode at each context: greedy tokens, one forward each, logits included."""
    def body(name, m):
        rows = []
        for ctx in s.contexts:
            try:
                rows.append(_decode_at(name, m, ctx, s))
            except Exception as e:
                rows.append(error_row("decode", name, e, context=ctx))
        return rows
    return _each("decode", models, body)


def _decode_at(name, m, ctx: int, s: BenchSettings) -> dict:
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

        row = _row("decode", name, run, m.device, decode_floor_ms(m, ctx, s.decode_tokens),
                   context=ctx, tokens=s.decode_tokens)
        if "ms" in row:
            row["tokens_per_s"] = s.decode_tokens / (row["ms"] * 1e-3)
        return row
    finally:
        sess.close()


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
    def body(name, m):
        Q = m.dream_queries.shape[0]
        sess = m.new_session()
        try:
            sess.extend(_embeds(m, 512))
            emb = torch.cat([m.embed_tokens([m.special.dream_start]), m.dream_queries])

            def run():
                _rewind(sess, 512)
                return sess.extend_dream(emb, list(range(1, Q + 1)))

            floor = (_weight_bytes(m) + _kv_bytes_per_token(m) * 600) / (ceilings()["copy_gbps"] * 1e9) * 1e3
            return [_row("dream", name, run, m.device, floor, tokens=Q + 1)]
        finally:
            sess.close()
    return _each("dream", models, body)


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


def unet_inputs(m):
    """One guided U-Net step's inputs at the default resolution: (sample, t, cond), batch 2."""
    d = m.config.diffusion
    lat = d.default_resolution // d.vae_scale_factor
    x = torch.randn(2, d.latent_channels, lat, lat, device=m.device, dtype=m.dtype)
    t = torch.tensor([981.0, 981.0], device=m.device)
    ctx = torch.randn(2, m.config.num_dream_queries, d.cross_attention_dim, device=m.device, dtype=m.dtype)
    return x, t, ctx


def vae_inputs(m):
    d = m.config.diffusion
    lat = d.default_resolution // d.vae_scale_factor
    return (torch.randn(1, d.latent_channels, lat, lat, device=m.device, dtype=m.dtype),)


def bench_unet(models: dict, s: BenchSettings) -> list[dict]:
    """One U-Net step at the guidance batch (2) and the default resolution, eager here (the
    compiled backends run isolated: baselines.py)."""
    m = next(iter(models.values()))
    x, t, ctx = unet_inputs(m)
    flops = count_flops(lambda: m.unet_eps(x, t, ctx))
    s.extra["unet_floor_ms"] = flops / _gemm_rate() * 1e3 if flops else None
    return [_row("unet", "eager", lambda: m.unet_eps(x, t, ctx), m.device, s.extra["unet_floor_ms"],
                 resolution=m.config.diffusion.default_resolution, batch=2)]


def bench_vae(models: dict, s: BenchSettings) -> list[dict]:
    m = next(iter(models.values()))
    (z,) = vae_inputs(m)
    flops = count_flops(lambda: m.vae_decode(z))
    s.extra["vae_floor_ms"] = flops / _gemm_rate() * 1e3 if flops else None
    return [_row("vae", "eager", lambda: m.vae_decode(z), m.device, s.extra["vae_floor_ms"],
                 resolution=m.config.diffusion.default_resolution)]


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
    x = denoise(m.unet_eps, make_noise_scheduler(d.scheduler), cond[None], cond[None], 7.5, steps, x, g)
    return decode_latents(m.vae_decode, x, d.vae_scaling_factor)


def bench_t2i(models: dict, s: BenchSettings) -> list[dict]:
    return _each("t2i", models, lambda name, m: [
        _row("t2i", name, lambda: _t2i(m, s.t2i_steps), m.device, None, steps=s.t2i_steps)])


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
    return _each("interleaved", models, lambda name, m: [
        _row("interleaved", name,
             lambda: _interleaved(m, s.interleaved_tokens, s.interleaved_images, s.t2i_steps),
             m.device, None, tokens=s.interleaved_tokens, images=s.interleaved_images)])


from ..devtools.host_overhead import bench_decode_loop, bench_host_overhead  # noqa: E402  (decode loop's stages)

RUNNERS = {"vision": bench_vision, "prefill": bench_prefill, "decode": bench_decode,
           "dream": bench_dream, "projection": bench_projection, "unet": bench_unet,
           "vae": bench_vae, "t2i": bench_t2i, "interleaved": bench_interleaved,
           "host": bench_host_overhead, "decode_loop": bench_decode_loop}
