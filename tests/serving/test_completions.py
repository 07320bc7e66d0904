"""POST /v1/completions through the official `openai` client: the server face of
`DreamLLMPipeline.complete()` (raw prompt, no chat template; `<dream_start>` ends a completion,
as `complete(..., max_images=0)`), with the images extension (an `images` list, one per
`<image>` placeholder). Batched scheduler on the engine's CPU path, plus the sequential one.
"""
import json

import pytest
import torch

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")
openai = pytest.importorskip("openai", reason="the serving tests drive the server with the openai client")

from serving_helpers import LiveServer, data_url, encode, scene  # noqa: E402

from dreamllm_fast.config import EngineConfig  # noqa: E402
from dreamllm_fast.pipeline import DreamLLMPipeline  # noqa: E402
from dreamllm_fast.serving import SequentialScheduler, ServeConfig, create_app  # noqa: E402
from dreamllm_fast.serving.batched import BatchedScheduler  # noqa: E402

MODEL = "tiny"
FEW_SHOT = "A dog says woof. A cat says meow. A cow says"
IMAGES = [scene(hue=0), scene(hue=60), scene(hue=120)]
IMAGE_PROMPT = "<image> This is a Welsh Corgi. <image> This is a Koala. <image> This is"
IMAGE_CONTENT = [IMAGES[0], " This is a Welsh Corgi. ", IMAGES[1], " This is a Koala. ", IMAGES[2],
                 " This is"]


@pytest.fixture(scope="module", params=["batched", "sequential"])
def client(request, tiny_ckpt):
    if request.param == "batched":
        pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", backend="engine",
                                                progress=False,
                                                engine_config=EngineConfig(max_batch=3, precision="fp32"))
        sched = BatchedScheduler(pipe, max_batch=3, warmup=False)
    else:
        pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32",
                                                backend="reference", progress=False)
        sched = SequentialScheduler(pipe, warmup=False)
    with LiveServer(create_app(sched, ServeConfig(model_name=MODEL, max_temperature=8.0))) as srv:
        assert sched.wait_ready(60), sched.health()
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        c.kind, c.url = request.param, srv.url
        yield c


def _complete(ref_pipe, content, n, **kw):
    doc = ref_pipe.complete(content, max_new_tokens=n, max_images=0, **kw)
    assert all(isinstance(x, str) for x in doc)
    return "".join(doc), len(ref_pipe.last_token_ids())


def test_few_shot_completion_equals_complete(client, ref_pipe):
    r = client.completions.create(model=MODEL, prompt=FEW_SHOT, max_tokens=8, temperature=0)
    text, n_tokens = _complete(ref_pipe, FEW_SHOT, 8)
    (ch,) = r.choices
    assert r.object == "text_completion" and ch.text == text and ch.index == 0
    assert ch.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == n_tokens
    assert r.usage.prompt_tokens == len(ref_pipe.prompts.raw(FEW_SHOT))  # no chat template


def test_default_max_tokens_is_openais_16(client, ref_pipe):
    r = client.completions.create(model=MODEL, prompt=FEW_SHOT, temperature=0)
    assert r.choices[0].text == _complete(ref_pipe, FEW_SHOT, 16)[0]


def test_images_in_a_raw_prompt(client, ref_pipe):
    urls = [data_url(encode(im)) for im in IMAGES]
    r = client.completions.create(model=MODEL, prompt=IMAGE_PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"images": urls})
    text, n_tokens = _complete(ref_pipe, IMAGE_CONTENT, 6)
    assert r.choices[0].text == text and r.usage.completion_tokens == n_tokens
    assert r.usage.prompt_tokens == len(ref_pipe.prompts.raw(IMAGE_CONTENT))


def test_stream_n_seed_and_stop(client, ref_pipe):
    kw = dict(model=MODEL, prompt=FEW_SHOT, max_tokens=10, temperature=8.0, top_p=0.95)
    pieces, finish = {0: [], 1: []}, {}
    for chunk in client.completions.create(seed=123, n=2, stream=True, **kw):
        assert chunk.object == "text_completion"
        for ch in chunk.choices:
            pieces[ch.index].append(ch.text)
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    for i, seed in enumerate((123, 124)):  # choice i draws from seed + i, as the chat route
        want, _ = _complete(ref_pipe, FEW_SHOT, 10, do_sample=True, temperature=8.0, top_p=0.95,
                            generator=torch.Generator().manual_seed(seed))
        assert "".join(pieces[i]) == want and i in finish
    full = client.completions.create(model=MODEL, prompt=FEW_SHOT, max_tokens=8, temperature=0).choices[0].text
    cut = full[2:4]
    r = client.completions.create(model=MODEL, prompt=FEW_SHOT, max_tokens=8, temperature=0, stop=[cut])
    assert r.choices[0].text == full[:full.index(cut)] and r.choices[0].finish_reason == "stop"


def test_a_stop_string_ends_generation_where_it_appears(client):
    """The decode loop applies stop strings on both schedulers: generation ends at the token that
    completes one (fewer completion tokens), and a stream carries the text before it in a delta
    chunk, then an empty finish chunk."""
    kw = dict(model=MODEL, prompt=FEW_SHOT, max_tokens=16, temperature=0)
    full = client.completions.create(**kw)
    text = full.choices[0].text
    # a second, longer stop string makes the first one's leading text wait in the hold-back, so
    # that text is still to send when the first completes
    at = next(i for i in range(4, len(text) - 1) if text.find(text[i:i + 2]) == i)
    cut, stops = text[at:at + 2], [text[at:at + 2], "\x01never\x01"]
    r = client.completions.create(stop=stops, **kw)
    assert r.choices[0].text == text[:text.index(cut)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < full.usage.completion_tokens, "generation went on past the stop"
    chunks = [(ch.text, ch.finish_reason) for chunk in client.completions.create(stop=stops, stream=True, **kw)
              for ch in chunk.choices]
    assert "".join(t for t, _ in chunks) == text[:text.index(cut)]
    assert chunks[-1] == ("", "stop") and all(f is None for _, f in chunks[:-1]), chunks


def test_refusals(client):
    for extra, words in (({"echo": True}, "echo"), ({"images": []}, "placeholder"),
                         ({"prompt": ["a", "b"]}, "one prompt"), ({"best_of": 3}, "best_of"),
                         ({"temperature": 9}, "temperature"), ({"images": ["file:///etc/passwd"],
                                                               "prompt": "<image> x"}, "images[0]")):
        body = {"model": MODEL, "prompt": IMAGE_PROMPT if extra.get("images") == [] else FEW_SHOT,
                **extra}
        r = httpx.post(client.url + "/v1/completions", content=json.dumps(body),
                       headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        assert words in r.json()["error"]["message"], (extra, r.json())
