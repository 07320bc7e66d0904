"""Live progress of an image drawn inside a streamed answer (serving/progress.py), on a real
server (the batched scheduler, the tiny checkpoint, CPU), read with the official `openai` client:
every chunk parses, the progress rides in `delta.model_extra["image_progress"]`, step k of N for
every U-Net step, a latent preview every few steps, all before the image, and the answer itself
is unchanged (equal to the pipeline's)."""
import base64
import io

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
pytest.importorskip("openai", reason="the serving tests drive the server with the openai client")

from PIL import Image  # noqa: E402
from serving_helpers import LiveServer, decode_b64_png  # noqa: E402

from dreamllm_fast.pipeline import DreamLLMPipeline  # noqa: E402
from dreamllm_fast.serving import ServeConfig, create_app  # noqa: E402
from dreamllm_fast.serving.batched import BatchedScheduler  # noqa: E402
from dreamllm_fast.serving.progress import preview_every  # noqa: E402

MODEL = "tiny"
SKY = [{"role": "user", "content": "Tell me about the sky."}]  # the tiny walk draws one image
STEPS = 7


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32",
                                            backend="reference", progress=False)
    sched = BatchedScheduler(pipe, warmup=False)
    with LiveServer(create_app(sched, ServeConfig(model_name=MODEL))) as srv:
        assert sched.wait_ready(60), sched.health()
        yield srv


def test_openai_client_parses_every_chunk_and_sees_progress_before_the_image(server, ref_pipe):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    extra = {"modalities": ["text", "image"], "num_inference_steps": STEPS, "seed": 5}
    stream = client.chat.completions.create(model=MODEL, messages=SKY, max_tokens=75, temperature=0,
                                            stream=True, extra_body=extra)
    seq, text = [], ["", ""]
    for chunk in stream:  # the client parses each chunk into ChatCompletionChunk
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            d = c.delta
            p = (d.model_extra or {}).get("image_progress")
            if p is not None:
                assert d.content is None  # progress never carries content
                seq.append(("progress", p))
            elif isinstance(d.content, list):
                seq.append(("image", d.content[0]["image_url"]["url"]))
            elif d.content:
                text[sum(1 for k, _ in seq if k == "image")] += d.content
    kinds = [k for k, _ in seq]
    assert kinds == ["progress"] * STEPS + ["image"], kinds
    progress = [p for k, p in seq if k == "progress"]
    assert [p["step"] for p in progress] == list(range(1, STEPS + 1))
    assert all(p["steps"] == STEPS for p in progress)
    with_preview = [p["step"] for p in progress if "preview" in p]
    every = preview_every(STEPS)
    assert with_preview == list(range(every, STEPS, every)) and with_preview
    c, h, w = ref_pipe.latent_shape()
    for p in progress:
        if "preview" in p:
            url = p["preview"]
            assert url.startswith("data:image/png;base64,")
            with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])), formats=["PNG"]) as im:
                assert im.size == (w, h) and im.mode == "RGB"
    # the answer itself is the pipeline's
    doc = ref_pipe.generate(SKY, max_new_tokens=75, num_inference_steps=STEPS,
                            generator=torch.Generator().manual_seed(5))
    assert [type(x).__name__ for x in doc] == ["str", "Image", "str"]
    assert text == [doc[0], doc[2]]
    got = decode_b64_png(seq[-1][1].split(",", 1)[1])
    assert np.array_equal(np.asarray(got), np.asarray(doc[1]))


def test_a_non_streamed_answer_has_no_progress(server):
    import httpx

    body = {"model": MODEL, "messages": SKY, "max_tokens": 75, "temperature": 0,
            "modalities": ["text", "image"], "num_inference_steps": 2, "seed": 5}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200
    parts = r.json()["choices"][0]["message"]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    assert "image_progress" not in r.text
