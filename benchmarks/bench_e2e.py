"""End-to-end DreamLLM-7B numbers: engine vs reference vs a torch.compile + static-cache baseline.

    python -m benchmarks.bench_e2e [--quick] [--out DIR] [--providers engine,reference,compiled]

Random weights at the released 7B shapes (timing depends on shapes only, performance.md), built on
the GPU in memory (`dreamllm_fast.engine.testing.random_checkpoint`, never written to disk); the
tokenizer of a tiny checkpoint stands in for the real one. All providers share one weight set.

Rows (CUDA events, median of reps, warm-up excluded; capture/compile time reported separately):
- decode tokens/s at context 128 and 1024 (steady-state steps, token fed back on device, no host
  sync between steps), with achieved GB/s of weight + KV reads vs the measured copy bandwidth;
- TTFT for 1 image + 512 text tokens (CLIP + projector + 770-token prefill + first logits);
- text-to-image, 50 DDPM steps with CFG, 512x512 (pipeline.text_to_image, output "pt");
- interleaved: ~300 text tokens + 2 generated images (50 steps each), pipeline-style decode.
Baselines: `reference` is the oracle backend (transformers eager + DynamicCache), `compiled` is HF
LLaMA with a StaticCache under torch.compile(mode="reduce-overhead", fullgraph=True) (decode only,
gpt-fast style). Results: benchmarks/results/<gpu>/bench_e2e.json via the shared harness.
"""
import tempfile
import time

import torch

from benchmarks.harness import ceilings, parser, print_rows, require_cuda, write_results

PROVIDERS = ("engine", "reference", "compiled")


def cuda_ms(fn, reps):
    """Median ms over `reps` calls of fn (one warm-up call excluded), CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def build(providers, dtype):
    from dreamllm_fast.checkpoint import load_tokenizer
    from dreamllm_fast.config import DreamLLMConfig, SpecialTokens
    from dreamllm_fast.engine.testing import random_checkpoint
    from dreamllm_fast.tiny import make_tiny

    tok = load_tokenizer(make_tiny(tempfile.mkdtemp(prefix="dreamllm_tok_")))
    special = SpecialTokens.from_tokenizer(tok)
    ck = random_checkpoint(DreamLLMConfig(), device="cuda", dtype=dtype)
    models, setup = {}, {}
    if "engine" in providers:
        from dreamllm_fast.engine import EngineModel

        t0 = time.perf_counter()
        models["engine"] = m = EngineModel(ck, special, device="cuda", dtype=dtype)
        setup["engine_load_s"] = time.perf_counter() - t0
        setup["engine_warmup_s"] = m.warmup_seconds
        setup["engine_graph_capture_s"] = m.graphs.capture_seconds if m.graphs else None
    if "reference" in providers or "compiled" in providers:
        from dreamllm_fast.reference import ReferenceModel

        models["reference"] = ReferenceModel(ck, special, device="cuda", dtype=dtype)
    return ck, tok, models, setup


def llm_bytes(cfg, ctx, dtype):
    """Bytes one decode step must read: every weight but the gathered embedding table + KV."""
    c = cfg.llm
    esz = torch.tensor([], dtype=dtype).element_size()
    per_layer = (c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
                 + c.hidden_size * c.num_attention_heads * c.head_dim + 3 * c.hidden_size * c.intermediate_size
                 + 2 * c.hidden_size)
    weights = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size + c.hidden_size
    kv = 2 * c.num_hidden_layers * ctx * c.num_key_value_heads * c.head_dim
    return (weights + kv) * esz


# -- decode ---------------------------------------------------------------------------------------
def decode_backend(model, ctx, steps, reps):
    """Steady-state decode through the backend interface; tokens fed back on device."""
    H = model.config.llm.hidden_size
    emb = (torch.randn(ctx, H, device="cuda") * 0.02).to(model.dtype)
    table = getattr(getattr(model, "weights", None), "embed", None)
    if table is None:
        table = model.llm.model.embed_tokens.weight
    state = {}

    def reset():
        if "s" in state:
            state["s"].close()
        state["s"] = s = model.new_session()
        state["logits"] = s.extend(emb)

    def run():
        s, logits = state["s"], state["logits"]
        for _ in range(steps):
            logits = s.extend(table[logits.argmax()][None])
        state["logits"] = logits

    times = []
    for _ in range(reps + 1):
        reset()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    state["s"].close()
    times = sorted(times[1:])
    return times[len(times) // 2] / steps


def decode_compiled(ref_model, ctx, steps, reps):
    """gpt-fast-style baseline: HF LLaMA + StaticCache, decode step under torch.compile."""
    from transformers import StaticCache

    llm = ref_model.llm
    H = llm.config.hidden_size
    cache = StaticCache(config=llm.config, max_cache_len=ctx + steps + 8)

    def step(x, pos, cache_pos):
        return llm(inputs_embeds=x, position_ids=pos, cache_position=cache_pos, past_key_values=cache,
                   use_cache=True).logits[:, -1].float()

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    emb = (torch.randn(1, ctx, H, device="cuda") * 0.02).to(ref_model.dtype)
    table = llm.model.embed_tokens.weight

    def run_once():
        cache.reset()
        pos = torch.arange(ctx, device="cuda")
        logits = step(emb, pos[None], pos)  # prefill eagerly
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(steps):
            p = torch.full((1,), ctx + i, device="cuda", dtype=torch.long)
            logits = compiled(table[logits.argmax(-1)][:, None], p[None], p)
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)

    t0 = time.perf_counter()
    run_once()  # compile + capture
    compile_s = time.perf_counter() - t0
    times = sorted(run_once() for _ in range(reps))
    return times[len(times) // 2] / steps, compile_s


# -- TTFT, T2I, interleaved ------------------------------------------------------------------------
def ttft(model, reps):
    H = model.config.llm.hidden_size
    S = model.config.vision.image_size
    px = torch.randn(1, 3, S, S, device="cuda")
    ids = torch.randint(3, 300, (512,)).tolist()

    def run():
        s = model.new_session()
        try:
            feats = model.encode_images(px)[0]
            emb = torch.cat([model.embed_tokens([1, model.special.im_start]), feats.to(model.dtype),
                             model.embed_tokens([model.special.im_end] + ids)])
            assert emb.shape == (2 + feats.shape[0] + 1 + 512, H)
            return s.extend(emb).argmax()
        finally:
            s.close()

    return cuda_ms(run, reps)


def t2i(pipe, steps, reps):
    def run():
        pipe.text_to_image("a photo of a corgi on the beach", num_inference_steps=steps, output_type="pt",
                           generator=torch.Generator("cuda").manual_seed(0), progress=False)

    return cuda_ms(run, reps)


def interleaved(pipe, n_text, n_images, steps, reps):
    """Scripted like pipeline.generate: prefill, text decode (host-synced sampling as the pipeline
    does), `<dream_start>` -> pipe._dream (queries, condition, diffusion, CLIP feedback), repeat."""
    from dreamllm_fast.sampling import SamplingParams, sample_token

    m = pipe.model
    sp = SamplingParams(max_new_tokens=n_text)
    prompt = pipe.prompts.chat([{"role": "user", "content": "Write a short illustrated story about a cat."}])
    opts = dict(max_images=n_images, num_inference_steps=steps, guidance_scale=7.5, negative_prompt=None)
    per_segment = n_text // (n_images + 1)

    def run():
        s = m.new_session()
        g = torch.Generator("cuda").manual_seed(0)
        try:
            logits = s.extend(pipe._embed_prompt(prompt))
            for seg in range(n_images + 1):
                for _ in range(per_segment):
                    tok = int(sample_token(logits, sp, g))
                    logits = s.extend(m.embed_tokens([tok]))
                if seg < n_images:
                    _, logits = pipe._dream(s, opts, g)
        finally:
            s.close()

    return cuda_ms(run, reps)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--providers", default=",".join(PROVIDERS),
                   help=f"comma-separated subset of {PROVIDERS}")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    args = p.parse_args()
    require_cuda()
    from dreamllm_fast.config import Precision
    from dreamllm_fast.pipeline import DreamLLMPipeline

    providers = [x for x in args.providers.split(",") if x]
    dtype = Precision.parse(args.dtype).dtype
    steps_decode, reps = (32, 3) if args.quick else (128, 5)
    diff_steps = 10 if args.quick else 50
    ck, tok, models, setup = build(providers, dtype)
    cfg = ck.config
    bw = ceilings()["copy_gbps"]
    rows = []
    for ctx in (128, 1024):
        for prov in providers:
            row = {"stage": "decode", "provider": prov, "ctx": ctx}
            try:
                if prov == "compiled":
                    ms, compile_s = decode_compiled(models["reference"], ctx, steps_decode, reps)
                    row["compile_s"] = compile_s
                else:
                    ms = decode_backend(models[prov], ctx, steps_decode, reps)
                gbps = llm_bytes(cfg, ctx, dtype) / (ms * 1e-3) / 1e9
                row.update(ms=ms, tok_s=1e3 / ms, gbps=gbps, frac_copy_bw=gbps / bw)
            except Exception as e:  # a failing baseline must not kill the run
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
    pipes = {prov: DreamLLMPipeline(models[prov], tok, progress=False)
             for prov in ("engine", "reference") if prov in providers}
    for prov, pipe in pipes.items():
        for stage, fn in (("ttft_1img_512txt", lambda: ttft(pipe.model, reps)),
                          (f"t2i_{diff_steps}steps", lambda: t2i(pipe, diff_steps, 1 if args.quick else 3)),
                          (f"interleaved_300tok_2img_{diff_steps}steps",
                           lambda: interleaved(pipe, 300, 2, diff_steps, 1 if args.quick else 2))):
            row = {"stage": stage, "provider": prov}
            try:
                row["ms"] = fn()
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
    print_rows(rows, ["stage", "provider", "ctx", "ms", "tok_s", "frac_copy_bw", "error"])
    write_results("bench_e2e", rows, args.out, extra={"setup": setup, "dtype": args.dtype,
                                                       "decode_steps": steps_decode, "quick": args.quick})


if __name__ == "__main__":
    main()
