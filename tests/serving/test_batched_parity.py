"""The batched scheduler's answers equal the one-request pipeline's, under concurrency.

16 requests of different lengths, mixing chat (streamed and not, greedy and seeded sampling,
n = 2), image input, text-to-image (two sizes, a negative prompt, n = 2) and interleaved answers
(streamed, a negative prompt), are sent at once to a real server on 127.0.0.1 by the official
openai client, one thread each. The expected answers come from the same `DreamLLMPipeline`, called
one request at a time before the server takes it over (tiny checkpoint, CPU, fp32).

- Text (greedy and seeded sampling) and token counts: EQUAL.
- Images: each pixel within 1 of 255 of the one-request image. Images denoised together go through
  one U-Net call of several rows (`diffusion.denoise_step`), whose fp32 rounding differs from the
  lone call's in the last bits: measured 2e-5 on the latents (tests/parity/test_diffusion_jobs.py),
  which can flip round(255 x) at a rounding boundary; the largest difference seen here is 1.
- Image conditions: the tiny model's pixels hardly depend on them, so every conditioning row the
  U-Net was given is compared with the rows the one-request runs gave it (within `COND_TOL`).

The run is checked for real batching (decode steps over several sequences, U-Net steps over
several images, prefill passes packing several prompts), so equality is not vacuous.
"""
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
openai = pytest.importorskip("openai", reason="the serving tests drive the server with the openai client")

from serving_helpers import LiveServer, Recorder, data_url, decode_b64_png, encode, scene  # noqa: E402

from dreamllm_fast.config import EngineConfig  # noqa: E402
from dreamllm_fast.pipeline import DreamLLMPipeline  # noqa: E402
from dreamllm_fast.serving import ServeConfig, create_app  # noqa: E402
from dreamllm_fast.serving.batched import BatchedScheduler  # noqa: E402

MODEL = "tiny"
HOT = dict(temperature=8.0, top_p=0.95)  # the tiny model's walk is so peaked that T <= 2 is greedy
# conditions computed in packed prefill passes vs lone ones: measured 4.8e-7 here (2-core Xeon,
# torch 2.14); a wrong negative prompt moves one by 2.0e-1
COND_TOL = 1e-5


def _user(text, image=None):
    content = text if image is None else [image, text]
    return [{"role": "user", "content": content}]


def _wire(msgs):
    """Pipeline messages -> OpenAI messages (PIL images as PNG data URLs)."""
    out = []
    for m in msgs:
        c = m["content"]
        if isinstance(c, list):
            c = [{"type": "text", "text": x} if isinstance(x, str) else
                 {"type": "image_url", "image_url": {"url": data_url(encode(x))}} for x in c]
        out.append({"role": m["role"], "content": c})
    return out


IMG_A, IMG_B = scene(96, 72), scene(80, 120, hue=60)
LONG = " ".join(["Please describe the little red house by the lake and the tree"] * 6)
# (kind, args): 16 requests
REQUESTS = [
    ("chat", dict(msgs=_user("hi"), max_tokens=5)),
    ("chat", dict(msgs=_user("Tell me about the sky."), max_tokens=40, stream=True)),
    ("chat", dict(msgs=_user(LONG), max_tokens=23)),
    ("chat", dict(msgs=[{"role": "system", "content": "Be brief."}] + _user("What is a cat?"),
                  max_tokens=17, stream=True)),
    ("chat", dict(msgs=_user("What is in this picture?", IMG_A), max_tokens=12)),
    ("chat", dict(msgs=_user("Describe it.", IMG_B), max_tokens=30, stream=True)),
    ("chat", dict(msgs=_user("Tell me about the sky."), max_tokens=14, seed=123, n=2, **HOT)),
    ("chat", dict(msgs=_user("A dog and a cat"), max_tokens=9, seed=7, stream=True, **HOT)),
    ("chat", dict(msgs=_user("one two three"), max_tokens=33)),
    ("image", dict(prompt="a red house under a yellow sun", n=2, size=64, seed=7, steps=2, gs=5.0)),
    ("image", dict(prompt="a blue lake", n=1, size=32, seed=3, steps=3, gs=3.0, negative="blurry")),
    ("image", dict(prompt="a green tree by the water", n=1, size=64, seed=11, steps=2, gs=1.0)),
    ("interleaved", dict(msgs=_user("Tell me about the sky."), max_tokens=75, seed=5, steps=2, gs=3.0)),
    ("interleaved", dict(msgs=_user("Tell me about the sky."), max_tokens=80, seed=9, steps=3, gs=4.0,
                         negative="dark", stream=True)),
    ("interleaved", dict(msgs=_user("hi"), max_tokens=20, seed=1, steps=2, gs=3.0)),
    ("chat", dict(msgs=_user("Tell me about the sky.", IMG_A), max_tokens=6)),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _expected(pipe, kind, a):
    """What the one-request pipeline answers: per choice (texts and images, completion tokens)."""
    out = []
    for i in range(a.get("n", 1)):
        if kind == "chat":
            kw = dict(do_sample=True, temperature=a["temperature"], top_p=a["top_p"],
                      generator=_gen(a["seed"] + i)) if "temperature" in a else {}
            out.append(([pipe.chat(a["msgs"], max_new_tokens=a["max_tokens"], **kw)],
                        len(pipe.last_token_ids())))
        elif kind == "image":
            img = pipe.text_to_image(a["prompt"], num_inference_steps=a["steps"], guidance_scale=a["gs"],
                                     negative_prompt=a.get("negative"), generator=_gen(a["seed"] + i),
                                     height=a["size"], width=a["size"])[0]
            out.append(([img], 0))
        else:
            doc = pipe.generate(a["msgs"], max_new_tokens=a["max_tokens"], num_inference_steps=a["steps"],
                                guidance_scale=a["gs"], negative_prompt=a.get("negative"),
                                generator=_gen(a["seed"] + i))
            out.append((doc, len(pipe.last_token_ids())))
    return out


def _call(client, kind, a):
    """The same request over HTTP -> per choice (texts and images, completion tokens or None)."""
    if kind == "image":
        extra = {"seed": a["seed"], "num_inference_steps": a["steps"], "guidance_scale": a["gs"]}
        if "negative" in a:
            extra["negative_prompt"] = a["negative"]
        r = client.images.generate(model=MODEL, prompt=a["prompt"], n=a["n"], size=f"{a['size']}x{a['size']}",
                                   response_format="b64_json", extra_body=extra)
        return [([decode_b64_png(d.b64_json)], 0) for d in r.data]
    extra = {}
    if kind == "interleaved":
        extra = {"modalities": ["text", "image"], "num_inference_steps": a["steps"],
                 "guidance_scale": a["gs"]}
        if "negative" in a:
            extra["negative_prompt"] = a["negative"]
    kw = dict(model=MODEL, messages=_wire(a["msgs"]), max_tokens=a["max_tokens"], n=a.get("n", 1),
              temperature=a.get("temperature", 0), extra_body=extra)
    if "seed" in a:
        kw["seed"] = a["seed"]
    if "top_p" in a:
        kw["top_p"] = a["top_p"]
    if not a.get("stream"):
        r = client.chat.completions.create(**kw)
        n = r.usage.completion_tokens if kw["n"] == 1 else None
        res = []
        for c in sorted(r.choices, key=lambda c: c.index):
            parts = c.message.content
            if isinstance(parts, list):
                parts = [p["text"] if p["type"] == "text" else
                         decode_b64_png(p["image_url"]["url"].split(",", 1)[1]) for p in parts]
            else:
                parts = [parts]
            res.append((parts, n))
        return res
    parts: list = []
    usage = None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage.completion_tokens
        d = ch.choices[0].delta.content if ch.choices else None
        if isinstance(d, list):
            parts.append(decode_b64_png(d[0]["image_url"]["url"].split(",", 1)[1]))
        elif d:
            if parts and isinstance(parts[-1], str):
                parts[-1] += d
            else:
                parts.append(d)
    return [(parts, usage)]


class _Contexts:
    """Wraps the pipeline's U-Net callable and keeps every conditioning row it was given: the tiny
    model's pixels depend little on the condition (a wrong negative prompt moved one interleaved
    image by 2/255), so the conditions themselves are compared."""

    def __init__(self, unet):
        self.unet, self.rows = unet, []

    def __call__(self, sample, t, context):
        self.rows.extend(context.unbind(0))
        return self.unet(sample, t, context)


@pytest.fixture(scope="module")
def setup(tiny_ckpt):
    pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", backend="engine",
                                            progress=False,
                                            engine_config=EngineConfig(max_batch=6, precision="fp32"))
    pipe.unet = _Contexts(pipe.unet)
    want = [_expected(pipe, kind, a) for kind, a in REQUESTS]
    want_ctx, pipe.unet.rows = _distinct(pipe.unet.rows), []
    sched = BatchedScheduler(pipe, observer=Recorder(), max_batch=6, max_queue=32, warmup=False)
    sched.observer.trace = []
    with LiveServer(create_app(sched, ServeConfig(model_name=MODEL, max_temperature=8.0))) as srv:
        assert sched.wait_ready(60), sched.health()
        srv.sched = sched
        srv.pipe = pipe
        yield srv, want, want_ctx


def _distinct(rows: list) -> torch.Tensor:
    out: list = []
    for r in rows:
        if not any(torch.equal(r, o) for o in out):
            out.append(r)
    return torch.stack(out)


def _nearest(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest distance from a row of `a` to its nearest row of `b` (max abs difference)."""
    return max((b - r).abs().flatten(1).max(1).values.min().item() for r in a)


def test_sixteen_concurrent_requests_equal_the_one_request_pipeline(setup):
    srv, want, want_ctx = setup
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    got: dict = {}
    start = threading.Barrier(len(REQUESTS))

    def run(k, kind, a):
        start.wait()
        try:
            got[k] = _call(client, kind, a)
        except Exception as e:  # noqa: BLE001 - reported below
            got[k] = e

    threads = [threading.Thread(target=run, args=(k, kind, a)) for k, (kind, a) in enumerate(REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    worst = 0
    for k, (kind, a) in enumerate(REQUESTS):
        assert not isinstance(got[k], Exception), (k, got[k])
        assert len(got[k]) == len(want[k]), k
        for (parts, n), (wparts, wn) in zip(got[k], want[k]):
            assert [isinstance(p, str) for p in parts] == [isinstance(p, str) for p in wparts], (k, parts)
            for p, w in zip(parts, wparts):
                if isinstance(p, str):
                    assert p == w, (k, p, w)
                else:
                    d = np.abs(np.asarray(p, dtype=np.int16) - np.asarray(w, dtype=np.int16))
                    worst = max(worst, int(d.max()))
                    assert d.max() <= 1, (k, int(d.max()))
            if n is not None:
                assert n == wn, (k, n, wn)
    print(f"largest pixel difference from the one-request images: {worst}/255")
    kinds = [type(p).__name__ for parts, _ in got[12] for p in parts]
    assert kinds == ["str", "Image", "str"]  # the interleaved answer drew its image mid-text
    # every image was conditioned as in the one-request pipeline, and on nothing else
    got_ctx = _distinct(srv.pipe.unet.rows)
    drift = max(_nearest(want_ctx, got_ctx), _nearest(got_ctx, want_ctx))
    print(f"conditions: {len(want_ctx)} expected, {len(got_ctx)} used, largest distance {drift:.1e}")
    assert len(got_ctx) >= len(want_ctx) and drift <= COND_TOL
    # the load was really batched
    trace = srv.sched.observer.trace
    assert max(len(e[1]) for e in trace if e[0] == "decode") >= 4
    assert max(len(e[1]) for e in trace if e[0] == "unet") >= 2
    assert max(len(e[1]) for e in trace if e[0] == "prefill") >= 2
    s = srv.sched.stats()
    assert s.kv_slots_used == 0 and s.running == 0 and s.requests["ok"] == len(REQUESTS)
