"""The `graphs` backend's whole denoising step and VAE decode at 512x512, on FAKE CUDA tensors.

    python -m dreamllm_fast.export.check_graphs [--json] [--images 1 2]

Under FakeTensorMode (dreamllm_fast/engine/fake_cuda.py; no GPU, no driver) the SD-2.1 U-Net and
VAE are built from their configs in fp16 on device "cuda", prepared as the backend prepares them
(channels-last, SDPA attention, fused GroupNorm(+SiLU) swapped in), and the whole CFG + DDPM step
is captured per image bucket through the engine's stand-in graph backend with `NoHostSync`
around every captured and replayed run: a host sync, a CPU tensor or a data-dependent op inside
the step fails the run. Triton launches are counted and skipped (`NoLaunch`); live bytes are
tracked (`LiveBytes`) for the pool a real capture would fill. Without a driver there are no CUDA
generators, so the slots draw from the global RNG here (the generator hand-over is tested on the
CPU: tests/export/test_graphs_backend.py). Under FakeTensorMode SDPA takes its math path, so the
attention stages hold score matrices that the flash path on a GPU does not: the memory figure is
an upper bound.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch


def run(images=(1, 2)) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from dreamllm_fast.config import DreamLLMConfig
    from dreamllm_fast.diffusion import DiffusionJob, make_noise_scheduler
    from dreamllm_fast.devtools.fake_cuda import LiveBytes, NoHostSync, NoLaunch, patched
    from dreamllm_fast.engine.graphs import StandInGraphs
    from dreamllm_fast.kernels import _utils

    from .fused_norm import count_group_norms
    from .graphs_backend import GraphDenoiser, StaticGraphs, prepare_module

    assert os.environ.get("TRITON_INTERPRET") != "1", \
        "run with TRITON_INTERPRET unset: the interpreter reads tensor data, fake tensors have none"
    cfg = DreamLLMConfig.from_name("dreamllm-7b")
    d = cfg.diffusion
    side = d.default_resolution // d.vae_scale_factor
    q, c = cfg.num_dream_queries, d.cross_attention_dim
    fp16, dev = torch.float16, torch.device("cuda", 0)
    _utils._SM_COUNT.setdefault(0, _utils.FAKE_CUDA_SMS)
    report: dict = {"resolution": d.default_resolution, "images": list(images)}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        mem = stack.enter_context(LiveBytes())
        launches = {"n": 0}

        class CountingLaunch(NoLaunch):
            def __getitem__(self, grid):
                launches["n"] += 1
                return super().__getitem__(grid)

        stack.enter_context(patched(torch.library, "wrap_triton", CountingLaunch))
        backend = StandInGraphs(guard=lambda: NoHostSync(dev), memory=mem, warmup_runs=0)
        from diffusers import AutoencoderKL, UNet2DConditionModel

        with torch.device("meta"):  # shapes only; fake CUDA tensors assigned in (as check7b loads)
            unet0, vae0 = UNet2DConditionModel.from_config(d.unet), AutoencoderKL.from_config(d.vae)
        for m in (unet0, vae0):
            m.load_state_dict({k: torch.empty(v.shape, dtype=fp16 if v.is_floating_point() else v.dtype,
                                              device=dev) for k, v in m.state_dict().items()},
                              strict=True, assign=True)
        unet, vae = prepare_module(unet0, fp16), prepare_module(vae0, fp16)
        report["group_norms_left"] = {"unet": count_group_norms(unet), "vae": count_group_norms(vae.decoder)}
        report["weights_bytes"] = mem.live
        den = GraphDenoiser(unet, backend, dtype=fp16, device=dev, max_images=max(images),
                            make_generator=lambda device: None)
        for n in images:
            jobs = []
            for _ in range(n):
                # a job's host part (scheduler, timesteps) is real; its device tensors are fake
                with unset_fake_temporarily():
                    small = torch.zeros(1, 1)
                    job = DiffusionJob(make_noise_scheduler(d.scheduler), small, small, 7.5, 50, small, None)
                job.latents = torch.empty(1, 4, side, side, device=dev, dtype=fp16)
                job.context = torch.empty(2, q, c, device=dev, dtype=fp16)
                jobs.append(job)
            assert den.reason(jobs) is None, den.reason(jobs)
            launches["n"] = 0
            den.step(jobs)  # capture (warm-up skipped on fake tensors) + the first replay
            first = launches["n"]
            launches["n"] = 0
            den.step(jobs)  # a second replay: the steady state
            report[f"whole step, {n} image(s)"] = {
                "triton launches per replay": launches["n"], "triton launches at capture + replay": first,
                "latents": list(jobs[0].latents.shape), "step index": jobs[0].index}
            den.release()
        decode = StaticGraphs(lambda z: vae.decode(z.contiguous(memory_format=torch.channels_last),
                                                   return_dict=False)[0], backend, 1)
        img = decode(torch.empty(1, 4, side, side, device=dev, dtype=fp16))
        report["vae image"] = list(img.shape)
        report["captures"], report["replays"] = backend.captures, backend.replays
        report["pool_bytes_estimate"] = backend.pool_bytes()
        report["peak_live_bytes"] = mem.peak
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.add_argument("--images", type=int, nargs="*", default=[1, 2], help="image buckets to capture")
    args = p.parse_args(argv)
    rep = run(tuple(args.images))
    if args.json:
        print(json.dumps(rep))
    else:
        for k, v in rep.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
