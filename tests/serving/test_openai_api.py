"""A real server on 127.0.0.1 driven by the official `openai` client, on the tiny checkpoint (CPU,
fp32): every answer equals `DreamLLMPipeline`'s direct output for the same settings and seeds.

The server owns its own pipeline; `ref_pipe` (conftest) is a second one on the same checkpoint,
called directly. Both are the reference backend in fp32 on the CPU, whose ops are deterministic,
so texts, token counts and image pixels must be EQUAL (no tolerance).
"""
import io

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
pytest.importorskip("openai", reason="the serving tests drive the server with the openai client")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")

from PIL import Image  # noqa: E402
from serving_helpers import GatedPipeline, LiveServer, data_url, decode_b64_png, encode, scene  # noqa: E402

from dreamllm_fast.pipeline import DreamLLMPipeline  # noqa: E402
from dreamllm_fast.serving import SequentialScheduler, ServeConfig, create_app  # noqa: E402

MODEL = "tiny"
TEXT = [{"role": "user", "content": "Tell me about the sky."}]


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    """The server's own pipeline, wrapped to record the messages each chat() receives."""
    return GatedPipeline(DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32",
                                                          backend="reference", progress=False))


@pytest.fixture(scope="module")
def server(served):
    sched = SequentialScheduler(served, max_queue=8)
    with LiveServer(create_app(sched, ServeConfig(model_name=MODEL, max_temperature=8.0))) as srv:
        assert sched.wait_ready(60), sched.health()
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "dreamllm-fast"
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_greedy_equals_pipeline_with_usage(client, ref_pipe):
    msgs = [{"role": "system", "content": "You are terse."}] + TEXT
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    want = ref_pipe.chat(msgs, max_new_tokens=12)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == want and want
    assert c.finish_reason == "length"
    # prompt_tokens is the real prompt: the template with THIS system message, tokenized
    assert r.usage.prompt_tokens == len(ref_pipe.prompts.chat(msgs))
    assert r.usage.completion_tokens == len(ref_pipe.last_token_ids()) == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_stream_equals_pipeline_pieces_and_stops_on_its_own(server, client, ref_pipe):
    """No max_tokens: up to the context (OpenAI's default); the tiny walk ends at <dream_start>."""
    stream = client.chat.completions.create(model=MODEL, messages=TEXT, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    want = list(ref_pipe.chat(TEXT, max_new_tokens=ref_pipe.max_len - len(ref_pipe.prompts.chat(TEXT)),
                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert pieces == want and len(want) > 10
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref_pipe.last_token_ids())
    assert chunks[-1].usage.prompt_tokens == len(ref_pipe.prompts.chat(TEXT))
    # The wire format ends with the [DONE] sentinel.
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": TEXT, "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_image_input_equals_pipeline(client, served, ref_pipe, fmt, mime):
    raw = encode(scene(), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(raw, mime)}},
        {"type": "text", "text": "What is in this picture?"}]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    with Image.open(io.BytesIO(raw)) as im:
        pil = im.convert("RGB")
    # The tiny model's text hardly depends on the image (its random CLIP features shift logits a
    # little), so the pixels the server handed the pipeline are compared directly: exactly those
    # of the sent file, decoded as the pipeline's own loader decodes it.
    (got_img, got_text) = served.calls[-1]["messages"][0]["content"]
    assert got_text == "What is in this picture?"
    assert got_img.mode == "RGB" and got_img.size == pil.size and got_img.tobytes() == pil.tobytes()
    ref_msgs = [{"role": "user", "content": [pil, "What is in this picture?"]}]
    assert r.choices[0].message.content == ref_pipe.chat(ref_msgs, max_new_tokens=6)
    n_prompt = len(ref_pipe.prompts.chat(ref_msgs))
    assert r.usage.prompt_tokens == n_prompt  # the image span counts (258 tokens here)
    assert n_prompt - len(ref_pipe.prompts.chat([{"role": "user", "content": "What is in this picture?"}])) \
        >= ref_pipe.config.image_span_len


def test_seeded_sampling_is_reproducible_and_equals_pipeline(client, ref_pipe):
    # The tiny model's walk is so peaked that T <= 2 samples the greedy text; T = 8 does not.
    kw = dict(model=MODEL, messages=TEXT, max_tokens=10, temperature=8.0, top_p=0.95)
    a = client.chat.completions.create(seed=123, n=2, **kw)
    b = client.chat.completions.create(seed=123, n=2, **kw)
    c = client.chat.completions.create(seed=999, **kw)
    texts = [ch.message.content for ch in a.choices]
    assert texts == [ch.message.content for ch in b.choices]
    for i, seed in enumerate((123, 124)):  # choice i draws from seed + i
        assert texts[i] == ref_pipe.chat(TEXT, max_new_tokens=10, do_sample=True, temperature=8.0,
                                         top_p=0.95, generator=_gen(seed))
    assert texts[0] != texts[1] and c.choices[0].message.content != texts[0]
    assert a.usage.completion_tokens == 20


def test_stop_strings_cut_the_text(client, ref_pipe):
    full = ref_pipe.chat(TEXT, max_new_tokens=30)
    stop = full[9:12]  # spans several streamed pieces
    want = full[:full.index(stop)]
    r = client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=30, temperature=0,
                                       stop=[stop, "never-there"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=30, temperature=0,
                                       stop=stop, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in s if c.choices]
    assert "".join(pieces) == want


def test_images_generate_equals_pipeline(client, ref_pipe):
    kw = dict(model=MODEL, prompt="a red house under a yellow sun", n=2, size="64x64",
              response_format="b64_json",
              extra_body={"seed": 7, "num_inference_steps": 3, "guidance_scale": 5.0,
                          "negative_prompt": "blurry"})
    r = client.images.generate(**kw)
    got = [np.asarray(decode_b64_png(d.b64_json)) for d in r.data]
    for i, seed in enumerate((7, 8)):  # image i draws from seed + i
        want = ref_pipe.text_to_image("a red house under a yellow sun", num_inference_steps=3,
                                      guidance_scale=5.0, negative_prompt="blurry",
                                      generator=_gen(seed), height=64, width=64)[0]
        assert np.array_equal(got[i], np.asarray(want))
    assert not np.array_equal(got[0], got[1])
    again = client.images.generate(**kw)
    assert [d.b64_json for d in again.data] == [d.b64_json for d in r.data]


def test_interleaved_answer_streamed_and_not_equals_pipeline(client, ref_pipe):
    extra = {"modalities": ["text", "image"], "num_inference_steps": 2, "guidance_scale": 3.0,
             "seed": 5}
    kw = dict(model=MODEL, messages=TEXT, max_tokens=75, temperature=0, extra_body=extra)
    doc = ref_pipe.generate(TEXT, max_new_tokens=75, num_inference_steps=2, guidance_scale=3.0,
                            generator=_gen(5))
    assert [type(x).__name__ for x in doc] == ["str", "Image", "str"]  # the tiny walk draws one

    def check(parts):
        assert [p["type"] for p in parts] == ["text", "image_url", "text"]
        assert parts[0]["text"] == doc[0] and parts[2]["text"] == doc[2]
        url = parts[1]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert np.array_equal(np.asarray(decode_b64_png(url.split(",", 1)[1])), np.asarray(doc[1]))

    r = client.chat.completions.create(**kw)
    check(r.choices[0].message.content)
    assert r.usage.completion_tokens == len(ref_pipe.last_token_ids())
    parts = []  # streamed: text deltas, and the image as one chunk when it is done
    for c in client.chat.completions.create(stream=True, **kw):
        d = c.choices[0].delta.content if c.choices else None
        if isinstance(d, list):
            assert len(d) == 1
            parts.append(d[0])
        elif d:
            if parts and parts[-1]["type"] == "text":
                parts[-1]["text"] += d
            else:
                parts.append({"type": "text", "text": d})
    check(parts)


def test_system_messages_and_assistant_images_follow_the_template(client, ref_pipe):
    img = scene(hue=40)
    msgs = [{"role": "developer", "content": "Rule one."},
            {"role": "system", "content": [{"type": "text", "text": "Rule two."}]},
            {"role": "user", "content": "Draw a house."},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Here:"},
                {"type": "image_url", "image_url": {"url": data_url(encode(img))}}]},
            {"role": "user", "content": "Thanks!"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    # leading system/developer messages become the one system prompt, joined by newlines; an
    # image in an assistant turn is a generated one (dream span + image span)
    ref = [{"role": "system", "content": "Rule one.\nRule two."},
           {"role": "user", "content": "Draw a house."},
           {"role": "assistant", "content": ["Here:", img]},
           {"role": "user", "content": "Thanks!"}]
    assert r.choices[0].message.content == ref_pipe.chat(ref, max_new_tokens=4)
    assert r.usage.prompt_tokens == len(ref_pipe.prompts.chat(ref))
