"""U-Net step, VAE decode and 50-step DDPM (+ 20-step dpmpp-2m / unipc) CFG loops per backend.

    python -m benchmarks.bench_unet [--quick] [--out DIR] [--backends eager,compiled,graphs,...]
                                    [--unet-rows 2,8] [--samplers ddpm:50,dpmpp-2m:20,unipc:20]
                                    [--autotune] [--preset tiny]

Real SD-2.1-base shapes with random weights (timing depends on shapes only):
U-Net sample [2,4,64,64] (CFG batch at 512x512), conditioning [2,64,1024]; VAE latent
[1,4,64,64] -> [1,3,512,512]. Backends: eager fp16 (diffusers, the baseline), compiled
(torch.compile, Inductor's default mode + our CUDA graph; `--autotune` for max-autotune, minutes
per shape), compiled-aoti (AOTInductor package),
onnxruntime (CUDA EP if installed), tensorrt (if installed), graphs (export/graphs_backend.py:
captured fp16 channels-last modules with the fused GroupNorm; its loops replay the whole captured
DDPM step, other samplers replay the captured U-Net call). U-Net rows: `unet_ms` at the CFG batch
of one image (2 rows) and `unet_r<rows>_ms` per other `--unet-rows` (8 = four images of the batched
server). Loops `loop_<sampler><steps>_ms` are the image stage of text-to-image (initial noise,
the steps, VAE decode), without the LLM's condition (`dreamllm-fast bench --stages t2i`). Each is built with strict=True, so
a missing backend is reported as skipped with its reason instead of silently timing eager.
Build/compile time is reported separately from the steady-state time. Results (ms, speedup vs
eager, env: GPU, driver, versions, git SHA, date) go to benchmarks/results/<gpu>/bench_unet.json
via the shared harness, rewritten after every backend (a later crash keeps the earlier rows).
`dreamllm-fast bench --stages unet vae` runs each non-eager backend in a child process instead. The U-Net reads 1.7 GB of fp16 weights per step (> L2), so input
rotation is moot here; inputs are fresh random tensors, never zeros.
"""
import time

import torch

from benchmarks.harness import cpu_bench, do_bench, parser, print_rows, require_cuda, write_results

BACKENDS = ("eager", "compiled", "compiled-aoti", "onnxruntime", "tensorrt", "graphs")


def _kind(name):
    return ("compiled", {"compile": "aoti"}) if name == "compiled-aoti" else (name, {})


def build(name, unet, vae, cfg, cache_dir, autotune=False, precision="fp16"):
    from dreamllm_fast.export.backends import make_unet_backend, make_vae_backend

    kind, opts = _kind(name)
    t0 = time.perf_counter()
    u = make_unet_backend(unet, kind, precision=precision, cache_dir=cache_dir, cfg=cfg, strict=True,
                          autotune=autotune, **opts)
    v = make_vae_backend(vae, kind, precision=precision, cache_dir=cache_dir, cfg=cfg, strict=True,
                         autotune=autotune, **opts)
    return u, v, time.perf_counter() - t0


def parse_samplers(text):
    """"ddpm:50,dpmpp-2m:20" -> [("ddpm", 50), ("dpmpp-2m", 20)] (a name alone: --steps)."""
    from dreamllm_fast.diffusion import check_sampler

    out = []
    for item in filter(None, text.split(",")):
        name, _, steps = item.partition(":")
        out.append((check_sampler(name), int(steps) if steps else None))
    return out


def denoise(cfg, unet_b, vae_b, steps, guidance=7.5, seed=0, sampler="ddpm", device="cuda",
            dtype=torch.float16):
    """The pipeline's diffusion stage (dreamllm_fast/diffusion.py, the loop the pipeline runs):
    CFG over [uncond; cond], `steps` steps of `sampler` (through the backend's whole-step graph
    when it has one), VAE decode."""
    from dreamllm_fast.diffusion import decode_latents, denoise as loop, make_noise_scheduler

    g = torch.Generator(device).manual_seed(seed)
    q, c = cfg.num_dream_queries, cfg.diffusion.cross_attention_dim
    cond = torch.randn(1, q, c, device=device, dtype=dtype, generator=g)
    lat = cfg.diffusion.default_resolution // cfg.diffusion.vae_scale_factor
    x = torch.randn(1, 4, lat, lat, device=device, dtype=dtype, generator=g)
    x = loop(unet_b, make_noise_scheduler(cfg.diffusion.scheduler, sampler), cond,
             torch.zeros_like(cond), guidance, steps, x, g, stepper=unet_b.step_runner)
    return decode_latents(vae_b, x, cfg.diffusion.vae_scaling_factor)


def time_loop(fn, reps):
    """Median ms of `reps` full loops (CUDA events; one warm-up loop excluded)."""
    fn()
    if not torch.cuda.is_available():  # the CPU smoke run (--preset tiny): wall clock, no claim
        return cpu_bench(fn, reps)[0]
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"subset of {BACKENDS}")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samplers", default="ddpm:50,dpmpp-2m:20,unipc:20",
                   help="end-to-end loops as sampler:steps (ddpm = the original's; 50 its steps)")
    p.add_argument("--cache-dir", default=None, help="export cache (default ~/.cache/dreamllm_fast)")
    p.add_argument("--autotune", action="store_true", help="Inductor max-autotune (compiled kinds)")
    p.add_argument("--unet-rows", default="2,8",
                   help="U-Net batch rows to time (2 = one image under guidance; 8 = four images)")
    p.add_argument("--preset", default="dreamllm-7b",
                   help="model shapes; 'tiny' runs the same code on the CPU (a smoke run, no claim)")
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dreamllm_fast.config import DreamLLMConfig

    cfg = DreamLLMConfig.from_name(args.preset)
    smoke = args.preset == "tiny" and not torch.cuda.is_available()
    if not smoke:
        require_cuda()
    dev, dt = ("cpu", torch.float32) if smoke else ("cuda", torch.float16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg.diffusion.unet).to(dev, dt).eval()
    vae = AutoencoderKL.from_config(cfg.diffusion.vae).to(dev, dt).eval()
    d = cfg.diffusion
    side = d.default_resolution // d.vae_scale_factor
    q, c = cfg.num_dream_queries, d.cross_attention_dim
    unet_rows = [int(r) for r in args.unet_rows.split(",") if r]
    inputs = {r: (torch.randn(r, 4, side, side, device=dev, dtype=dt),
                  torch.full((r,), 981.0, device=dev),
                  torch.randn(r, q, c, device=dev, dtype=dt)) for r in unet_rows}
    z = torch.randn(1, 4, side, side, device=dev, dtype=dt)
    steps = 5 if args.quick else args.steps
    loops = [(n, 2 if smoke else 5 if args.quick else (k or steps))
             for n, k in parse_samplers(args.samplers)]
    rows, base = [], {}
    extra = {"dtype": str(dt).replace("torch.", ""), "steps": steps, "autotune": args.autotune,
             "preset": args.preset, "smoke": smoke}
    for name in args.backends.split(","):
        row = {"backend": name, "unet_shape": f"rows x4x{side}x{side} cond rows x{q}x{c}",
               "vae_shape": f"1x4x{side}x{side}"}
        try:
            u, v, build_s = build(name, unet, vae, cfg, args.cache_dir, args.autotune,
                                  precision="fp32" if smoke else "fp16")
        except Exception as e:  # noqa: BLE001 - report and keep benchmarking the others
            row["skipped"] = f"{type(e).__name__}: {e}"[:300]
            print(f"{name}: skipped ({row['skipped']})")
            rows.append(row)
            write_results("bench_unet", rows, args.out, extra=extra)
            continue
        t0 = time.perf_counter()
        for r in unet_rows:
            u(*inputs[r])  # first call: compile / capture / engine warm-up
        v(z)
        if not smoke:
            torch.cuda.synchronize()
        row["build_s"] = build_s
        row["first_call_s"] = time.perf_counter() - t0
        for r in unet_rows:
            col = "unet" if r == 2 else f"unet_r{r}"
            row[f"{col}_ms"], row[f"{col}_p20"], row[f"{col}_p80"] = do_bench(lambda: u(*inputs[r]))
        row["vae_ms"], row["vae_p20"], row["vae_p80"] = do_bench(lambda: v(z))
        for sampler, k in loops:  # loop_<sampler><steps>_ms: diffusion + VAE, the T2I image stage
            row[f"loop_{sampler}{k}_ms"] = time_loop(
                lambda: denoise(cfg, u, v, k, sampler=sampler, device=dev, dtype=dt),
                1 if args.quick or smoke else 3)
        if u.step_runner is not None:
            row["whole_step_replays"] = u.step_runner.replays
        if name == "eager":
            base = dict(row)
        for k in [c for c in row if c.endswith("_ms")]:
            if k in base:
                row[k.replace("_ms", "_speedup")] = base[k] / row[k]
        rows.append(row)
        write_results("bench_unet", rows, args.out, extra=extra)
        del u, v
        if not smoke:
            torch.cuda.empty_cache()
    loop_cols = [f"loop_{n}{k}_ms" for n, k in loops]
    unet_cols = ["unet_ms" if r == 2 else f"unet_r{r}_ms" for r in unet_rows]
    print_rows(rows, ["backend", *unet_cols, "unet_speedup", "vae_ms", "vae_speedup", *loop_cols,
                      "build_s"])
    write_results("bench_unet", rows, args.out, extra=extra)


if __name__ == "__main__":
    main()
