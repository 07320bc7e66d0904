"""Samplers other than the original's DDPM (`sampler="dpmpp-2m"` / `"unipc"`) equal diffusers'
StableDiffusionPipeline with that scheduler class, the same prompt_embeds and generator; jobs of
multistep samplers batched together (the server's image step) equal their solo runs.

Tiny checkpoint, fp32, CPU. Same-math comparisons: the pipeline and diffusers run the same ops in
the same order on the same modules, so the images agree to fp32 rounding (measured max |diff| 0 to
6e-8 on [0, 1] images), hence 1e-6 as in test_reference_pipeline.py.
"""
import pytest
import torch

from dreamllm_fast.diffusion import (SAMPLERS, DiffusionJob, denoise_step, make_noise_scheduler,
                                     prepare_latents, sampler_of)
from dreamllm_fast.errors import InvalidInputError

PROMPT = "a lighthouse at night"
CLASSES = {"ddpm": "DDPMScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler",
           "unipc": "UniPCMultistepScheduler"}


def _diffusers_pipe(pipe, sampler):
    from diffusers import StableDiffusionPipeline

    m = pipe.model
    sd = StableDiffusionPipeline(vae=m.vae, text_encoder=None, tokenizer=None, unet=m.unet,
                                 scheduler=make_noise_scheduler(pipe.config.diffusion.scheduler, sampler),
                                 safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


def test_make_noise_scheduler_builds_diffusers_classes_from_the_sd21_config(ref_pipe):
    cfg = ref_pipe.config.diffusion.scheduler
    for name in SAMPLERS:
        s = make_noise_scheduler(cfg, name)
        assert type(s).__name__ == CLASSES[name] and sampler_of(s) == name
        # the model's training schedule carries over (betas, spacing, prediction type)
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                    "prediction_type", "timestep_spacing", "steps_offset"):
            assert s.config[key] == cfg[key], (name, key)
    dpm = make_noise_scheduler(cfg, "dpmpp-2m")
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    with pytest.raises(InvalidInputError, match="sampler must be one of"):
        make_noise_scheduler(cfg, "euler")


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "unipc"])
def test_sampler_image_equals_diffusers_stable_diffusion_pipeline(ref_pipe, sampler):
    pipe = ref_pipe
    steps, scale = 5, 5.0
    cond, uncond = pipe.encode_condition(PROMPT)
    ours = pipe.text_to_image(PROMPT, num_inference_steps=steps, guidance_scale=scale,
                              generator=torch.Generator().manual_seed(7), output_type="pt",
                              sampler=sampler)
    res = pipe.config.diffusion.default_resolution
    theirs = _diffusers_pipe(pipe, sampler)(
        prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
        guidance_scale=scale, generator=torch.Generator().manual_seed(7), height=res, width=res,
        output_type="pt").images
    diff = (ours - theirs).abs().max().item()
    print(f"{sampler}: max |ours - diffusers| = {diff:.2e}")
    assert ours.shape == theirs.shape == (1, 3, res, res)
    assert diff < 1e-6
    # not vacuous: the sampler changes the image (DDPM with the same seed differs)
    ddpm = pipe.text_to_image(PROMPT, num_inference_steps=steps, guidance_scale=scale,
                              generator=torch.Generator().manual_seed(7), output_type="pt")
    assert (ddpm - theirs).abs().max() > 1e-3


def test_unknown_sampler_is_refused_before_any_work(ref_pipe):
    with pytest.raises(InvalidInputError, match=r"sampler must be one of .*'ddpm'"):
        ref_pipe.text_to_image(PROMPT, num_inference_steps=2, sampler="euler-a")
    with pytest.raises(InvalidInputError, match="sampler must be one of"):
        ref_pipe.generate([{"role": "user", "content": "hi"}], max_new_tokens=1, sampler="DDIM")


# (sampler, steps, guidance scale, seed): different samplers, grids and settings batched together
JOBS = [("dpmpp-2m", 4, 5.0, 1), ("unipc", 3, 2.0, 2), ("dpmpp-2m", 3, 1.0, 3), ("ddpm", 2, 4.0, 4)]


def test_batched_multistep_jobs_equal_their_solo_runs(ref_pipe):
    """Each job's multistep history lives in its own scheduler: stepping jobs of different samplers
    and step counts together gives each one its solo image (fp32 summation order only: measured
    max |diff| 2.0e-5 (dpmpp-2m, 4 steps); bound 1e-4, as the U-Net's rows are computed
    in a different batch)."""
    pipe = ref_pipe
    cfg = pipe.config.diffusion
    Q, C = pipe.config.num_dream_queries, cfg.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    conds = [(torch.randn(1, Q, C, generator=g), torch.randn(1, Q, C, generator=g)) for _ in JOBS]

    def job(i):
        sampler, steps, scale, seed = JOBS[i]
        gen = torch.Generator().manual_seed(seed)
        lat = prepare_latents((1,) + pipe.latent_shape(), torch.float32, "cpu", gen, None)
        return DiffusionJob(make_noise_scheduler(cfg.scheduler, sampler), *conds[i], scale, steps, lat, gen)

    solo = []
    for i in range(len(JOBS)):
        j = job(i)
        while not j.done:
            denoise_step(pipe.unet, [j])
        solo.append(j.latents)
    jobs = [job(i) for i in range(len(JOBS))]
    while any(not j.done for j in jobs):
        denoise_step(pipe.unet, [j for j in jobs if not j.done])
    for i, (j, s) in enumerate(zip(jobs, solo)):
        d = (j.latents - s).abs().max().item()
        print(f"job {i} ({JOBS[i][0]}): batched vs solo {d:.2e}")
        assert torch.isfinite(j.latents).all() and d < 1e-4, (i, d)
    assert (jobs[0].latents - jobs[2].latents).abs().max() > 1e-2
