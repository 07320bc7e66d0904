"""U-Net step, VAE decode and a 50-step DDPM + CFG loop per export backend (GPU only).

    python -m benchmarks.bench_unet [--quick] [--out DIR] [--backends eager,compiled,...] [--autotune]

Real SD-2.1-base shapes with random weights (timing depends on shapes only):
U-Net sample [2,4,64,64] (CFG batch at 512x512), conditioning [2,64,1024]; VAE latent
[1,4,64,64] -> [1,3,512,512]. Backends: eager fp16 (diffusers, the baseline), compiled
(torch.compile, Inductor's default mode + our CUDA graph; `--autotune` for max-autotune, minutes
per shape), compiled-aoti (AOTInductor package),
onnxruntime (CUDA EP if installed), tensorrt (if installed). Each is built with strict=True, so
a missing backend is reported as skipped with its reason instead of silently timing eager.
Build/compile time is reported separately from the steady-state time. Results (ms, speedup vs
eager, env: GPU, driver, versions, git SHA, date) go to benchmarks/results/<gpu>/bench_unet.json
via the shared harness, rewritten after every backend (a later crash keeps the earlier rows).
`dreamllm-fast bench --stages unet vae` runs each non-eager backend in a child process instead. The U-Net reads 1.7 GB of fp16 weights per step (> L2), so input
rotation is moot here; inputs are fresh random tensors, never zeros.
"""
import time

import torch

from benchmarks.harness import do_bench, parser, print_rows, require_cuda, write_results

BACKENDS = ("eager", "compiled", "compiled-aoti", "onnxruntime", "tensorrt")


def _kind(name):
    return ("compiled", {"compile": "aoti"}) if name == "compiled-aoti" else (name, {})


def build(name, unet, vae, cfg, cache_dir, autotune=False):
    from dreamllm_fast.export.backends import make_unet_backend, make_vae_backend

    kind, opts = _kind(name)
    t0 = time.perf_counter()
    u = make_unet_backend(unet, kind, precision="fp16", cache_dir=cache_dir, cfg=cfg, strict=True,
                          autotune=autotune, **opts)
    v = make_vae_backend(vae, kind, precision="fp16", cache_dir=cache_dir, cfg=cfg, strict=True,
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


def denoise(cfg, unet_b, vae_b, steps, guidance=7.5, seed=0, sampler="ddpm", device="cuda"):
    """The pipeline's diffusion stage (dreamllm_fast/diffusion.py, the loop the pipeline runs):
    CFG over [uncond; cond], `steps` steps of `sampler`, VAE decode."""
    from dreamllm_fast.diffusion import decode_latents, denoise as loop, make_scheduler

    g = torch.Generator(device).manual_seed(seed)
    q, c = cfg.num_dream_queries, cfg.diffusion.cross_attention_dim
    cond = torch.randn(1, q, c, device=device, dtype=torch.float16, generator=g)
    lat = cfg.diffusion.default_resolution // cfg.diffusion.vae_scale_factor
    x = torch.randn(1, 4, lat, lat, device=device, dtype=torch.float16, generator=g)
    x = loop(unet_b, make_scheduler(cfg.diffusion.scheduler, sampler), cond,
             torch.zeros_like(cond), guidance, steps, x, g)
    return decode_latents(vae_b, x, cfg.diffusion.vae_scaling_factor)


def time_loop(fn, reps):
    """Median ms of `reps` full loops (CUDA events; one warm-up loop excluded)."""
    fn()
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
    args = p.parse_args(argv)
    require_cuda()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dreamllm_fast.config import DreamLLMConfig

    cfg = DreamLLMConfig.from_name("dreamllm-7b")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg.diffusion.unet).to("cuda", torch.float16).eval()
    vae = AutoencoderKL.from_config(cfg.diffusion.vae).to("cuda", torch.float16).eval()
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    t = torch.tensor([981.0, 981.0], device="cuda")
    ehs = torch.randn(2, 64, 1024, device="cuda", dtype=torch.float16)
    z = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16)
    steps = 5 if args.quick else args.steps
    loops = [(n, 5 if args.quick else (k or steps)) for n, k in parse_samplers(args.samplers)]
    rows, base = [], {}
    extra = {"dtype": "fp16", "steps": steps, "autotune": args.autotune}
    for name in args.backends.split(","):
        row = {"backend": name, "unet_shape": "2x4x64x64 cond 2x64x1024", "vae_shape": "1x4x64x64"}
        try:
            u, v, build_s = build(name, unet, vae, cfg, args.cache_dir, args.autotune)
        except Exception as e:  # noqa: BLE001 - report and keep benchmarking the others
            row["skipped"] = f"{type(e).__name__}: {e}"[:300]
            print(f"{name}: skipped ({row['skipped']})")
            rows.append(row)
            write_results("bench_unet", rows, args.out, extra=extra)
            continue
        t0 = time.perf_counter()
        u(x, t, ehs), v(z)  # first call: compile / capture / engine warm-up
        torch.cuda.synchronize()
        row["build_s"] = build_s
        row["first_call_s"] = time.perf_counter() - t0
        row["unet_ms"], row["unet_p20"], row["unet_p80"] = do_bench(lambda: u(x, t, ehs))
        row["vae_ms"], row["vae_p20"], row["vae_p80"] = do_bench(lambda: v(z))
        for sampler, k in loops:  # loop_<sampler><steps>_ms: diffusion + VAE, the T2I image stage
            row[f"loop_{sampler}{k}_ms"] = time_loop(
                lambda: denoise(cfg, u, v, k, sampler=sampler), 1 if args.quick else 3)
        if name == "eager":
            base = dict(row)
        for k in [c for c in row if c.endswith("_ms")]:
            if k in base:
                row[k.replace("_ms", "_speedup")] = base[k] / row[k]
        rows.append(row)
        write_results("bench_unet", rows, args.out, extra=extra)
        del u, v
        torch.cuda.empty_cache()
    loop_cols = [f"loop_{n}{k}_ms" for n, k in loops]
    print_rows(rows, ["backend", "unet_ms", "unet_speedup", "vae_ms", "vae_speedup", *loop_cols,
                      "build_s"])
    write_results("bench_unet", rows, args.out, extra=extra)


if __name__ == "__main__":
    main()
