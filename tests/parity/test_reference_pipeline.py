"""The reference pipeline against things not written here: a plain transformers LLaMA forward,
diffusers' own StableDiffusionPipeline, and a truncated CLIP tower.

Tolerances: all fp32 on the CPU. Cached/chunked forwards differ from one full forward only by
summation order (measured max |diff| ~1e-6 on logits of magnitude ~10), hence 1e-4 absolute.
"""
import pytest
import torch

from dreamllm_fast.diffusion import make_noise_scheduler


def _full_llm_logits(pipe, embeds):
    """One plain LlamaForCausalLM forward on inputs_embeds, no cache: the independent oracle."""
    with torch.no_grad():
        return pipe.model.llm(inputs_embeds=embeds[None]).logits[0].float()


def test_chunked_session_equals_one_full_forward(ref_pipe):
    pipe = ref_pipe
    prompt = pipe.prompts.chat([{"role": "user", "content": "tell me a story"}])
    emb = pipe._embed_prompt(prompt)
    extra = pipe.model.embed_tokens([300, 301, 302, 303])
    full = _full_llm_logits(pipe, torch.cat([emb, extra]))
    s = pipe.model.new_session()
    got = [s.extend(emb)] + [s.extend(extra[i:i + 1]) for i in range(4)]
    want = full[len(emb) - 1:]
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4
    assert s.length == len(emb) + 4


def test_t2i_condition_is_normed_hidden_at_query_positions(ref_pipe):
    pipe = ref_pipe
    cond, uncond = pipe.encode_condition("a red dog")
    Q, C = pipe.config.num_dream_queries, pipe.config.diffusion.cross_attention_dim
    assert cond.shape == (1, Q, C) and uncond.shape == (1, Q, C)
    m = pipe.model
    # <s> prompt <dream_start> Q1..QQ, one uncached forward; post-final-norm states; no bias.
    ids = pipe.tokenizer("a red dog").input_ids + [pipe.special.dream_start]
    emb = torch.cat([m.embed_tokens(ids), m.dream_queries])
    with torch.no_grad():
        h = m.llm.model(inputs_embeds=emb[None]).last_hidden_state[0, len(ids):]
        want = h @ m.cond_proj.weight.T
    assert torch.allclose(cond[0], want, rtol=1e-4, atol=1e-5)
    # The unconditional branch: "<s> <dream_start> Q..", queries at positions 2..Q+1.
    emb_u = torch.cat([m.embed_tokens([pipe.special.bos, pipe.special.dream_start]), m.dream_queries])
    with torch.no_grad():
        want_u = m.llm.model(inputs_embeds=emb_u[None]).last_hidden_state[0, 2:] @ m.cond_proj.weight.T
    assert torch.allclose(uncond[0], want_u, rtol=1e-4, atol=1e-5)
    # A wrong reading (the pre-norm states) is far off: the test can tell.
    with torch.no_grad():
        pre = m.llm.model(inputs_embeds=emb[None], output_hidden_states=True).hidden_states[-2][0, len(ids):]
    assert not torch.allclose(cond[0], pre @ m.cond_proj.weight.T, rtol=1e-2, atol=1e-3)


def test_original_two_pass_condition_matches_one_pass(ref_pipe):
    """The original runs the prompt, then the 66-token dream span on its cache."""
    pipe = ref_pipe
    m = pipe.model
    ids = pipe.tokenizer("two cats").input_ids
    span = torch.cat([m.embed_tokens([pipe.special.dream_start]), m.dream_queries,
                      m.embed_tokens([pipe.special.dream_end])])
    s = m.new_session()
    s.extend(m.embed_tokens(ids))
    two_pass = s.extend_dream(span, list(range(1, m.dream_queries.shape[0] + 1)))
    one_pass = pipe.encode_condition("two cats")[0][0]
    rel = (two_pass - one_pass).norm() / one_pass.norm()
    assert rel < 1e-5, rel


def test_image_features_are_penultimate_layer_without_cls(ref_pipe):
    from transformers import CLIPVisionModel

    pipe = ref_pipe
    m = pipe.model
    px = torch.randn(2, 3, 224, 224)
    got = m.encode_images(px)
    P, H = pipe.config.vision.num_patches, pipe.config.llm.hidden_size
    assert got.shape == (2, P, H)
    cfg = pipe.config.vision.to_hf()
    cfg.num_hidden_layers -= 1  # stop after the penultimate layer
    trunc = CLIPVisionModel(cfg).eval()
    trunc.load_state_dict({k: v for k, v in m.clip.state_dict().items()
                           if f"layers.{cfg.num_hidden_layers}." not in k}, strict=True)
    with torch.no_grad():
        want = m.clip_proj(trunc(px).last_hidden_state[:, 1:])
    assert torch.allclose(got, want, atol=1e-5)


def test_image_equals_diffusers_stable_diffusion_pipeline(ref_pipe):
    from diffusers import StableDiffusionPipeline

    pipe = ref_pipe
    m = pipe.model
    cond, uncond = pipe.encode_condition("a lighthouse at night")
    ours = pipe.text_to_image("a lighthouse at night", num_inference_steps=4, guidance_scale=5.0,
                              generator=torch.Generator().manual_seed(7), output_type="pt")
    sd = StableDiffusionPipeline(vae=m.vae, text_encoder=None, tokenizer=None, unet=m.unet,
                                 scheduler=make_noise_scheduler(pipe.config.diffusion.scheduler),
                                 safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    res = pipe.config.diffusion.default_resolution
    theirs = sd(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=4,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(7), height=res,
                width=res, output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, res, res)
    assert (ours - theirs).abs().max() < 1e-6
    # A different generator gives a different image: the comparison is not vacuous.
    other = pipe.text_to_image("a lighthouse at night", num_inference_steps=4, guidance_scale=5.0,
                               generator=torch.Generator().manual_seed(8), output_type="pt")
    assert (other - theirs).abs().max() > 1e-3


def test_guidance_batch_order_is_uncond_then_cond(ref_pipe):
    pipe = ref_pipe
    seen = []
    orig = pipe.unet

    def spy(sample, t, ctx):
        seen.append(ctx)
        return orig(sample, t, ctx)

    pipe.unet = spy
    try:
        cond, uncond = pipe.encode_condition("a boat")
        pipe.text_to_image("a boat", num_inference_steps=1, guidance_scale=3.0, output_type="pt")
    finally:
        pipe.unet = orig
    assert torch.equal(seen[0][0], uncond[0]) and torch.equal(seen[0][1], cond[0])


def test_interleaved_generation_feeds_the_image_back(ref_pipe):
    """The tiny model writes 70 tokens, <dream_start>, then (after the fed-back image) 40 more."""
    pipe = ref_pipe
    doc = pipe.generate([{"role": "user", "content": "draw"}], max_new_tokens=200,
                        num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    kinds = [type(x).__name__ for x in doc]
    assert kinds == ["str", "Image", "str"], kinds
    ids = pipe.last_token_ids()
    assert ids.count(pipe.special.dream_start) == 1 and ids[-1] == pipe.special.eos
    # Without the feedback span the model would not take its post-image branch: check the branch.
    after = ids[ids.index(pipe.special.dream_start) + 1]
    m = pipe.model
    s = m.new_session()
    prompt = pipe.prompts.chat([{"role": "user", "content": "draw"}])
    s.extend(pipe._embed_prompt(prompt))
    for t in ids[:ids.index(pipe.special.dream_start)]:
        s.extend(m.embed_tokens([t]))
    s.extend_dream(torch.cat([m.embed_tokens([pipe.special.dream_start]), m.dream_queries]),
                   list(range(1, m.dream_queries.shape[0] + 1)))
    logits = s.extend(torch.cat([m.embed_tokens([pipe.special.dream_end, pipe.special.im_start]),
                                 m.encode_images(pipe.preprocess([doc[1]]))[0],
                                 m.embed_tokens([pipe.special.im_end])]))
    assert int(logits.argmax()) == after


def test_chat_stops_and_streams(ref_pipe):
    pipe = ref_pipe
    msgs = [{"role": "user", "content": "hello"}]
    text = pipe.chat(msgs, max_new_tokens=100)
    ids = pipe.last_token_ids()
    assert ids[-1] == pipe.special.dream_start and len(ids) == 71  # chat stops at <dream_start>
    assert "".join(pipe.chat(msgs, max_new_tokens=100, stream=True)) == text
    assert pipe.tokenizer.decode(ids[:-1], skip_special_tokens=True) == text
    short = pipe.chat(msgs, max_new_tokens=5)
    assert len(pipe.last_token_ids()) == 5 and text.startswith(short)


def test_multimodal_prompt_condition_splices_the_image(ref_pipe):
    """In-context generation: ["a dog", image, " wearing sunglasses"] puts the image span before
    <dream_start>; the uncond branch stays the empty prompt."""
    from PIL import Image

    pipe = ref_pipe
    m = pipe.model
    img = Image.new("RGB", (256, 256), (200, 40, 40))
    cond, uncond = pipe.encode_condition(["a dog", img, " wearing sunglasses"])
    assert torch.equal(uncond, pipe.encode_condition("a dog")[1])
    sp = pipe.special
    P, Q = pipe.config.vision.num_patches, pipe.config.num_dream_queries
    ids_a = pipe.tokenizer("a dog").input_ids
    ids_b = pipe.tokenizer.convert_tokens_to_ids(
        pipe.tokenizer.tokenize("<im_end> wearing sunglasses"))[1:]
    feats = m.encode_images(pipe.preprocess([img]))[0]
    emb = torch.cat([m.embed_tokens(ids_a + [sp.im_start]), feats, m.embed_tokens([sp.im_end] + ids_b
                     + [sp.dream_start]), m.dream_queries])
    with torch.no_grad():
        want = m.llm.model(inputs_embeds=emb[None]).last_hidden_state[0, -Q:] @ m.cond_proj.weight.T
    assert torch.allclose(cond[0], want, rtol=1e-4, atol=1e-5)
    assert len(emb) == len(ids_a) + P + 2 + len(ids_b) + 1 + Q
    other = pipe.encode_condition(["a dog", Image.new("RGB", (256, 256), (0, 0, 250)), " wearing sunglasses"])[0]
    assert not torch.allclose(cond, other, atol=1e-4)  # the image matters


def test_interleaved_negative_prompt_drives_the_uncond_branch(ref_pipe):
    pipe = ref_pipe
    want = pipe.encode_condition("a", negative_prompt="blurry, dark")[1][0]
    seen, orig = [], pipe.unet

    def spy(sample, t, ctx):
        seen.append(ctx)
        return orig(sample, t, ctx)

    pipe.unet = spy
    try:
        doc = pipe.generate([{"role": "user", "content": "draw"}], max_new_tokens=200,
                            num_inference_steps=1, negative_prompt="blurry, dark")
    finally:
        pipe.unet = orig
    assert [type(x).__name__ for x in doc] == ["str", "Image", "str"]
    assert len(seen) == 1 and torch.allclose(seen[0][0], want, atol=1e-6)
    assert not torch.allclose(seen[0][0], pipe.encode_condition("a")[1][0], atol=1e-4)
