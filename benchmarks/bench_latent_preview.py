"""Cost of the live image preview (dreamllm_fast/serving/progress.py) against a U-Net step.

    python -m benchmarks.bench_latent_preview [--device cpu|cuda] [--threads N]

Rows: the preview's linear map on the scheduler's worker thread (`latent_preview`, per preview)
and its PNG + base64 encoding (done on the event loop's thread pool, off the worker), at the tiny
model's latent size and Stable Diffusion 2.1's (64 x 64 for 512 px, 96 x 96 for 768 px); then one
U-Net step of the tiny checkpoint (classifier-free guidance, batch 2) on the same device. A
preview is sent at most every `preview_every(steps)` >= 2 steps, so its share of the denoising
time is at most half the per-preview ratio printed. Host wall time, median of repeats.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dreamllm_fast.serving.progress import Preview, latent_preview


def _median_s(fn, n: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for hw in (8, 64, 96):
        lat = torch.randn(1, 4, hw, hw, device=dev)
        m = _median_s(lambda: latent_preview(lat), 500, sync)
        e = _median_s(lambda: Preview(latent_preview(lat)).png_data_url(), 100, sync)
        print(f"latent 4x{hw}x{hw}: map {m * 1e6:8.1f} us (worker)   map+png {e * 1e6:8.1f} us")

    from dreamllm_fast.diffusion import DiffusionJob, denoise_step, make_noise_scheduler
    from dreamllm_fast.pipeline import DreamLLMPipeline
    from dreamllm_fast.tiny import make_tiny

    pipe = DreamLLMPipeline.from_pretrained(make_tiny(Path(tempfile.mkdtemp()) / "tiny"), device=dev,
                                            dtype="fp32", backend="reference", progress=False)
    cond = pipe.uncond_condition(None)
    shape = (1,) + tuple(pipe.latent_shape())
    job = DiffusionJob(make_noise_scheduler(pipe.config.diffusion.scheduler), cond[None], cond[None], 7.5,
                       500, torch.randn(shape, device=dev))
    step = _median_s(lambda: denoise_step(pipe.unet, [job]), 50, sync)
    lat = torch.randn(shape, device=dev)
    m = _median_s(lambda: latent_preview(lat), 500, sync)
    print(f"tiny U-Net step (latent {list(shape)}, CFG): {step * 1e3:.2f} ms; one preview "
          f"{m * 1e6:.1f} us = {100 * m / step:.2f}% of a step")


if __name__ == "__main__":
    main()
