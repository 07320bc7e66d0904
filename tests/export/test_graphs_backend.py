"""The `graphs` U-Net/VAE backend (export/graphs_backend.py) on the CPU: the engine's stand-in
graph backend runs the capture/replay bookkeeping (buckets, padding, static buffers, per-slot
generators, whole-step replays) at the tiny checkpoint's shapes, fp32.

Numerics (stated here and in the report): the whole-step graph computes DDPM's update from a
per-image coefficient table in fp32 where diffusers runs the same formula op by op, and the
prepared U-Net runs channels-last; against eager diffusers on the same latents and noise, the final
tiny image's PSNR is >= 100 dB (measured 125.9 dB, max |diff| 2.7e-6 on [0, 1] pixels). fp16 on a GPU vs
fp16 eager and each vs an fp32 arbiter is the GPU test at the bottom (skipped here).
"""
import copy
import math

import pytest
import torch

from dreamllm_fast.diffusion import DiffusionJob, denoise_step, make_noise_scheduler, prepare_latents
from dreamllm_fast.engine.graphs import StandInGraphs
from dreamllm_fast.export.backends import make_unet_backend, make_vae_backend
from dreamllm_fast.export.fused_norm import FusedGroupNorm, count_group_norms, swap_group_norms

PROMPT = "a lighthouse at night"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1]."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def graphs_pipe(ref_pipe):
    """A second pipeline over the reference pipeline's model, with the graphs backends."""
    from dreamllm_fast.pipeline import DreamLLMPipeline

    pipe = DreamLLMPipeline(ref_pipe.model, ref_pipe.tokenizer, progress=False)
    pipe.set_diffusion_backends("graphs", "graphs", max_images=4)
    return pipe


def test_the_swap_fuses_every_group_norm_and_keeps_the_math(ref_pipe):
    """On CPU tensors the fused modules run torch's own GroupNorm + SiLU: equal outputs."""
    m = ref_pipe.model
    unet, vae = copy.deepcopy(m.unet), copy.deepcopy(m.vae)
    n_u, n_v = count_group_norms(unet), count_group_norms(vae.decoder)
    assert swap_group_norms(unet) == n_u and swap_group_norms(vae.decoder) == n_v
    assert count_group_norms(unet) == 0 and count_group_norms(vae.decoder) == 0
    assert sum(isinstance(x, FusedGroupNorm) and x.silu for x in unet.modules()) >= 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, m.config.num_dream_queries, m.config.diffusion.cross_attention_dim, generator=g)
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, m.unet(x, t, ctx).sample)
        assert torch.equal(vae.decode(x[:1]).sample, m.vae.decode(x[:1]).sample)


def test_fused_blocks_through_the_triton_kernel(ref_pipe):
    """A swapped ResnetBlock2D (two fused norm + SiLU pairs) and the output norm + SiLU, with the
    kernel forced (Triton interpreter), stay within fp32 rounding of diffusers' modules (measured
    max |diff| 7e-7 for the whole tiny U-Net; one block here, to keep the interpreter's time low)."""
    import dreamllm_fast.kernels as K

    if K.backend() == "ref":
        pytest.skip("DREAMLLM_KERNELS=ref")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or the interpreter")
    from torch import nn

    m = ref_pipe.model
    block = m.unet.down_blocks[0].resnets[0]
    holder = nn.Module()
    holder.block, holder.conv_norm_out, holder.conv_act = (copy.deepcopy(block),
                                                            copy.deepcopy(m.unet.conv_norm_out), nn.SiLU())
    assert swap_group_norms(holder) == 3 and isinstance(holder.conv_act, nn.Identity)
    g = torch.Generator().manual_seed(1)
    c = block.norm1.num_channels
    x = torch.randn(1, c, 8, 8, generator=g)
    temb = torch.randn(1, block.time_emb_proj.in_features, generator=g)
    K.set_backend("triton")
    try:
        with torch.no_grad():
            got = holder.conv_act(holder.conv_norm_out(holder.block(x, temb)))
    finally:
        K.set_backend(None)
    with torch.no_grad():
        want = m.unet.conv_act(m.unet.conv_norm_out(block(x, temb)))
    diff = (got - want).abs().max().item()
    print(f"fused blocks (Triton interpreter) vs diffusers: max |diff| {diff:.2e}")
    assert diff < 1e-4


def test_unet_and_vae_graphs_pad_to_buckets_and_equal_eager(ref_pipe):
    m = ref_pipe.model
    backend = StandInGraphs()
    u = make_unet_backend(m.unet, "graphs", precision="fp32", graph_backend=backend, max_images=4,
                          strict=True)
    v = make_vae_backend(m.vae, "graphs", precision="fp32", graph_backend=backend, max_images=4,
                         strict=True)
    assert u.name == "graphs" and u.max_rows == 8 and u.step_runner is not None
    assert v.step_runner is None
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=g)
    ctx = torch.randn(3, m.config.num_dream_queries, m.config.diffusion.cross_attention_dim, generator=g)
    t = torch.tensor([900.0, 500.0, 20.0])
    eps = u(x, t, ctx)
    with torch.no_grad():
        want = m.unet(x, t, encoder_hidden_states=ctx).sample
    assert eps.shape == (3, 4, 8, 8) and (eps - want).abs().max() < 1e-4
    assert [k[0] for k in u.runner.graphs.graphs] == [4]  # 3 rows ran in the 4-row bucket
    u(x[:1], t[:1], ctx[:1])
    assert sorted(k[0] for k in u.runner.graphs.graphs) == [1, 4]
    image = v(x[:2])
    with torch.no_grad():
        want_img = m.vae.decode(x[:2]).sample
    assert (image - want_img).abs().max() < 1e-4
    # the output is a copy: a later replay does not change it
    before = eps.clone()
    u(x.flip(0), t, ctx)
    assert torch.equal(eps, before)
    assert backend.captures == 3 and backend.replays == 4


def test_t2i_whole_step_graphs_vs_eager_diffusers(ref_pipe, graphs_pipe):
    """text_to_image through the whole-step graph: one replay per step, the request generator
    advanced exactly as the eager loop advances it, the image within 100 dB PSNR of eager."""
    steps = 4
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    want = ref_pipe.text_to_image(PROMPT, num_inference_steps=steps, guidance_scale=5.0, generator=g1,
                                  output_type="pt")
    stepper = graphs_pipe.stepper
    before = stepper.replays
    got = graphs_pipe.text_to_image(PROMPT, num_inference_steps=steps, guidance_scale=5.0, generator=g2,
                                    output_type="pt")
    p = psnr(got, want)
    print(f"graphs (stand-in, fp32) vs eager diffusers: PSNR {p:.1f} dB, max |diff| "
          f"{(got - want).abs().max().item():.2e}")
    assert stepper.replays - before == steps
    assert torch.equal(g1.get_state(), g2.get_state()), "the request generator must advance as in eager"
    assert p >= 100.0
    other = graphs_pipe.text_to_image(PROMPT, num_inference_steps=steps, guidance_scale=5.0,
                                      generator=torch.Generator().manual_seed(8), output_type="pt")
    assert psnr(other, want) < 60.0  # not vacuous: another seed is another image


def _job(pipe, seed, steps, scale, sampler="ddpm"):
    cfg = pipe.config.diffusion
    gen = torch.Generator().manual_seed(seed)
    Q, C = pipe.config.num_dream_queries, cfg.cross_attention_dim
    cond, uncond = torch.randn(1, Q, C, generator=gen), torch.randn(1, Q, C, generator=gen)
    lat = prepare_latents((1,) + pipe.latent_shape(), torch.float32, "cpu", gen, None)
    return DiffusionJob(make_noise_scheduler(cfg.scheduler, sampler), cond, uncond, scale, steps, lat, gen)


def test_server_jobs_join_and_leave_the_whole_step_graph(ref_pipe, graphs_pipe):
    """The batched server's pattern: images at different steps, a job that joins late, one that
    the graph does not take (dpmpp-2m: the captured U-Net call and the eager step instead);
    every image equals its eager solo run and its generator ends where the solo run's did."""
    specs = [(1, 4, 5.0, "ddpm"), (2, 3, 3.0, "ddpm"), (3, 3, 4.0, "dpmpp-2m"), (4, 2, 2.0, "ddpm")]
    solo = []
    for s in specs:
        j = _job(ref_pipe, *s)
        while not j.done:
            denoise_step(ref_pipe.unet, [j])
        solo.append(j)
    jobs = [_job(ref_pipe, *s) for s in specs]
    stepper = graphs_pipe.stepper
    assert stepper.reason([jobs[2]]) == "sampler 'dpmpp-2m' (the whole-step graph is DDPM's)"
    before = stepper.replays
    for rnd in range(4):  # job 3 joins at round 1; job 1 and 3 leave after round 2
        live = [j for j in (jobs[0], jobs[1]) + ((jobs[3],) if rnd >= 1 else ()) if not j.done]
        denoise_step(graphs_pipe.unet, live, stepper)
        if not jobs[2].done:
            denoise_step(graphs_pipe.unet, [jobs[2]], stepper)
    assert stepper.replays - before == 4  # one whole-step replay per round
    for i, (j, s) in enumerate(zip(jobs, solo)):
        d = (j.latents - s.latents).abs().max().item()
        print(f"job {i} ({specs[i][3]}): graphs vs eager solo {d:.2e}")
        assert j.done and d < 1e-4, (i, d)
        assert torch.equal(j.generator.get_state(), s.generator.get_state()), i


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA; none found")
def test_graphs_fp16_psnr_on_a_gpu(tiny_ckpt):
    """fp16 graphs vs fp16 eager, and each vs an fp32 eager arbiter, on the same generator."""
    from dreamllm_fast.pipeline import DreamLLMPipeline

    def run(dtype, kind):
        pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype=dtype,
                                                backend="reference", progress=False)
        pipe.set_diffusion_backends(kind, kind)
        return pipe.text_to_image(PROMPT, num_inference_steps=10, guidance_scale=5.0, output_type="pt",
                                  generator=torch.Generator("cuda").manual_seed(3)).float()

    arb, eager16, graphs16 = run("fp32", "eager"), run("fp16", "eager"), run("fp16", "graphs")
    p_ge, p_ea, p_ga = psnr(graphs16, eager16), psnr(eager16, arb), psnr(graphs16, arb)
    print(f"PSNR graphs16 vs eager16 {p_ge:.1f} dB, eager16 vs fp32 {p_ea:.1f} dB, graphs16 vs fp32 {p_ga:.1f} dB")
    assert p_ga >= p_ea - 3.0  # no worse than eager fp16 against the arbiter, within 3 dB


def test_batched_server_steps_images_through_the_whole_step_graph(ref_pipe, graphs_pipe):
    """The batched scheduler over a pipeline with the graphs backends: two images of one request
    are one whole-step replay per step, and each equals the eager pipeline's image within 1 of 255
    (rows batched in one U-Net call round differently; measured difference here: at most 1)."""
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (fastapi)")
    pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra (uvicorn)")
    httpx = pytest.importorskip("httpx", reason="the server test needs httpx")
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).parents[1] / "serving"))
    from serving_helpers import LiveServer, decode_b64_png

    from dreamllm_fast.serving import ServeConfig, create_app
    from dreamllm_fast.serving.batched import BatchedScheduler

    sched = BatchedScheduler(graphs_pipe, max_batch=2, max_queue=2, warmup=False)
    before = graphs_pipe.stepper.replays
    with LiveServer(create_app(sched, ServeConfig(model_name="tiny"))) as srv:
        assert sched.wait_ready(60), sched.health()
        r = httpx.post(srv.url + "/v1/images/generations", timeout=120,
                       json={"model": "tiny", "prompt": "a red house", "n": 2, "num_inference_steps": 3,
                             "seed": 4, "size": "64x64"})
    assert r.status_code == 200, r.text
    assert graphs_pipe.stepper.replays - before == 3  # both images in each replay
    for i, d in enumerate(r.json()["data"]):
        got = np.asarray(decode_b64_png(d["b64_json"])).astype(int)
        want = ref_pipe.text_to_image("a red house", num_inference_steps=3, height=64, width=64,
                                      generator=torch.Generator().manual_seed(4 + i))[0]
        assert np.abs(got - np.asarray(want).astype(int)).max() <= 1, i
