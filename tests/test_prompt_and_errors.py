"""Prompt layout (template, spans) and bad input: clear typed errors, engine usable afterwards."""
import threading

import pytest
import torch
from PIL import Image

from dreamllm_fast.errors import (ContextOverflowError, EngineBusyError, ImageLoadError,
                                  InvalidInputError)
from dreamllm_fast.prompt import SYSTEM_MESSAGE
from dreamllm_fast.sampling import SamplingParams, filter_logits, sample_token

IMG = Image.new("RGB", (300, 200), (10, 120, 200))


def test_chat_template_is_vicuna_v11_sft(ref_pipe):
    images = []
    text = ref_pipe.prompts.chat_text([
        {"role": "user", "content": [IMG, "What is this?"]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "Sure?"}], images)
    P = ref_pipe.config.vision.num_patches
    span = "<im_start>" + "<im_patch>" * P + "<im_end>"
    assert text == (SYSTEM_MESSAGE + " USER: " + span + "\nWhat is this? ASSISTANT: A square.</s>"
                    "USER: Sure? ASSISTANT:")
    assert len(images) == 1


def test_spans_and_slots(ref_pipe):
    sp = ref_pipe.special
    P, Q = ref_pipe.config.vision.num_patches, ref_pipe.config.num_dream_queries
    p = ref_pipe.prompts.chat([{"role": "user", "content": [IMG, "hi"]},
                               {"role": "assistant", "content": ["look", IMG]},
                               {"role": "user", "content": "again"}])
    assert p.ids[0] == sp.bos and len(p.image_slots) == 2 and len(p.dream_slots) == 1
    s = p.image_slots[0]
    assert p.ids[s - 1] == sp.im_start and p.ids[s + P] == sp.im_end
    d = p.dream_slots[0]  # a generated image: dream span, then the image span (Q + 2 + P + 2)
    assert p.ids[d - 1] == sp.dream_start and p.ids[d + Q] == sp.dream_end
    assert p.ids[d + Q + 1] == sp.im_start and p.image_slots[1] == d + Q + 2
    t2i = ref_pipe.prompts.raw("a cat", dream_queries=True)
    assert t2i.ids[-Q - 1] == sp.dream_start and t2i.dream_slots == [len(t2i) - Q]


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "x"}], "alternate"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
    ([{"role": "user", "content": "<im_start> sneaky"}], "special token"),
    ([{"role": "user", "content": [3.5]}], "neither text nor an image"),
    ([{"role": "user"}], "'role' and 'content'"),
])
def test_bad_messages(ref_pipe, messages, match):
    with pytest.raises(InvalidInputError, match=match):
        ref_pipe.chat(messages, max_new_tokens=2)


def test_prompt_longer_than_context_is_refused_before_work(ref_pipe):
    n = ref_pipe.max_len // ref_pipe.config.image_span_len + 1
    calls = []
    orig = ref_pipe.model.encode_images
    ref_pipe.model.encode_images = lambda *a: calls.append(1) or orig(*a)
    try:
        with pytest.raises(ContextOverflowError, match=r"needs \d+ positions .* context holds 2048"):
            ref_pipe.chat([{"role": "user", "content": [IMG] * n + ["describe"]}], max_new_tokens=4)
        with pytest.raises(ContextOverflowError, match="lower max_new_tokens"):
            ref_pipe.chat([{"role": "user", "content": "hi"}], max_new_tokens=5000)
    finally:
        ref_pipe.model.encode_images = orig
    assert not calls  # refused before encoding any image
    assert isinstance(ref_pipe.chat([{"role": "user", "content": "hi"}], max_new_tokens=3), str)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=2.5), "num_inference_steps"),
    (dict(num_inference_steps=1001), "num_inference_steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(output_type="np"), "output_type"),
    (dict(height=30), "multiple of"),
    (dict(latents=torch.zeros(1, 4, 3, 3)), "latents must have shape"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2"),
])
def test_bad_image_settings(ref_pipe, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        ref_pipe.text_to_image("a cat", **{"num_inference_steps": 1, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_bad_sampling_settings(ref_pipe, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        ref_pipe.chat([{"role": "user", "content": "hi"}], **kwargs)


def test_unreadable_image(ref_pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    from pathlib import Path

    with pytest.raises(ImageLoadError, match="bad.png.*cannot be decoded"):
        ref_pipe.chat([{"role": "user", "content": [bad, "what?"]}], max_new_tokens=2)
    with pytest.raises(ImageLoadError, match="does not exist"):
        ref_pipe.chat([{"role": "user", "content": [Path(tmp_path / "nope.jpg"), "what?"]}],
                      max_new_tokens=2)
    with pytest.raises(ImageLoadError, match=r"\[H, W, 3\]"):
        ref_pipe.chat([{"role": "user", "content": [torch.zeros(5, 5), "what?"]}], max_new_tokens=2)
    # still usable afterwards
    assert ref_pipe.chat([{"role": "user", "content": [IMG, "what?"]}], max_new_tokens=3) is not None


def test_concurrent_calls_are_refused_not_interleaved(ref_pipe):
    started, release = threading.Event(), threading.Event()
    orig = ref_pipe.model.new_session

    def slow_session():
        started.set()
        release.wait(10)
        return orig()

    ref_pipe.model.new_session = slow_session
    t = threading.Thread(target=lambda: ref_pipe.chat([{"role": "user", "content": "hi"}],
                                                      max_new_tokens=2))
    t.start()
    try:
        assert started.wait(10)
        with pytest.raises(EngineBusyError, match="one at a time"):
            ref_pipe.encode_condition("a cat")
    finally:
        release.set()
        t.join()
        ref_pipe.model.new_session = orig
    assert ref_pipe.encode_condition("a cat")[0].shape[0] == 1


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    p = filter_logits(logits, 1.0, top_k=2, top_p=1.0)
    assert p[0, 0] == 0 and p[0, 3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    p = filter_logits(logits, 1.0, top_k=0, top_p=0.5)
    assert torch.equal(p[0] > 0, torch.tensor([False, True, False, False]))
    greedy = sample_token(logits, SamplingParams())
    assert int(greedy) == 1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_token(logits, SamplingParams(do_sample=True, top_k=1), g) for _ in range(20)])
    assert (draws == 1).all()
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_token(logits, SamplingParams(do_sample=True), g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.03)
