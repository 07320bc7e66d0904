"""What a hostile-client audit found (issue 20), as regression tests against a real server on
127.0.0.1 with the batched scheduler (the default) on the tiny checkpoint's engine CPU path.

Every bad input is refused with 400 and OpenAI's error JSON before it is admitted, while innocent
greedy requests decode beside it; their answers equal the one-request pipeline's. Before the fix,
top_k >= 2**63 failed every sequence of the decode step it joined, num_inference_steps 1000 failed
the shared U-Net step, and a system-only conversation, a lone surrogate and size "8x8" were 500s.
"""
import json
import time
import threading

import pytest

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")

from serving_helpers import LiveServer, Recorder, wait_until  # noqa: E402

from dreamllm_fast.config import EngineConfig  # noqa: E402
from dreamllm_fast.pipeline import DreamLLMPipeline  # noqa: E402
from dreamllm_fast.serving import ServeConfig, create_app  # noqa: E402
from dreamllm_fast.serving.batched import BatchedScheduler  # noqa: E402

MODEL = "tiny"
SLOTS = 3
SKY = [{"role": "user", "content": "Tell me about the sky."}]
SEA = [{"role": "user", "content": "What lives in the sea?"}]
CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", backend="engine",
                                            progress=False,
                                            engine_config=EngineConfig(max_batch=SLOTS, precision="fp32"))
    sched = BatchedScheduler(pipe, observer=Recorder(), max_batch=SLOTS, max_queue=4, warmup=False)
    with LiveServer(create_app(sched, ServeConfig(model_name=MODEL))) as srv:
        assert sched.wait_ready(60), sched.health()
        srv.sched = sched
        yield srv


def chat(messages=None, max_tokens=3, **extra):
    body = {"model": MODEL, "messages": messages or [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, "temperature": 0}
    body.update(extra)
    return body


def interleaved(**extra):
    return chat(SKY, 10, modalities=["text", "image"], **extra)


def assert_openai_error(r, status=400, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    for w in words:
        assert w in err["message"], (w, err["message"])


# (name, route, body or raw bytes, headers, words the message must hold)
BAD = [
    ("top_k 2**63", CHAT, chat(top_k=2**63, temperature=1.0), None, ["top_k"]),
    ("top_k 10**30", CHAT, chat(top_k=10**30, temperature=1.0), None, ["top_k"]),
    ("steps 1000 (interleaved)", CHAT, interleaved(num_inference_steps=1000), None, ["[1, 999]"]),
    ("steps 1000 (images)", IMAGES, {"prompt": "x", "num_inference_steps": 1000}, None, ["[1, 999]"]),
    ("size 8x8", IMAGES, {"prompt": "x", "size": "8x8"}, None, ["multiple of 16 in [32, 128]"]),
    ("size 40x40", IMAGES, {"prompt": "x", "size": "40x40"}, None, ["multiple of 16"]),
    ("seed 2**63", CHAT, chat(seed=2**63), None, ["seed"]),
    ("seed 2**64-1", IMAGES, {"prompt": "x", "seed": 2**64 - 1}, None, ["seed"]),
    ("seed -2**63-1", CHAT, chat(seed=-2**63 - 1), None, ["seed"]),
    ("temperature 2.5", CHAT, chat(temperature=2.5), None, ["temperature"]),
    ("n 2**40", CHAT, chat(n=2**40), None, ["n"]),
    ("max_tokens 2**40", CHAT, chat(max_tokens=2**40), None, ["max_tokens"]),
    ("content []", CHAT, chat([{"role": "user", "content": []}]), None, ["content"]),
    ("system only", CHAT, chat([{"role": "system", "content": "be brief"}]), None, ["user message"]),
    ("two system only", CHAT, chat([{"role": "system", "content": "a"},
                                    {"role": "developer", "content": "b"}]), None, ["user message"]),
    ("lone surrogate", CHAT, b'{"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", '
                             b'"content": "x\\ud800y"}]}', {"content-type": "application/json"},
     ["surrogate", "messages.0.content"]),
    ("lone surrogate key", CHAT, b'{"model": "tiny", "\\udfff": 1}', None, ["surrogate"]),
    ("form content-type", CHAT, json.dumps(chat()).encode(),
     {"content-type": "application/x-www-form-urlencoded"}, ["Content-Type", "application/json"]),
    ("text content-type", CHAT, json.dumps(chat()).encode(), {"content-type": "text/plain"},
     ["Content-Type"]),
]


def test_every_bad_input_is_a_400_and_innocent_requests_beside_it_are_unchanged(server, ref_pipe):
    sched = server.sched
    out = {}

    def innocent(name, messages, n):
        out[name] = httpx.post(server.url + CHAT, json=chat(messages, n), timeout=300)

    threads = [threading.Thread(target=innocent, args=("sky", SKY, 40)),
               threading.Thread(target=innocent, args=("sea", SEA, 30))]
    sched.observer.on_iteration = lambda s: time.sleep(0.1)  # keep them decoding meanwhile
    try:
        for t in threads:
            t.start()
        wait_until(lambda: sched.stats().running == 2, 30, "the innocent requests decoding")
        for name, route, body, headers, words in BAD:
            if isinstance(body, bytes):
                r = httpx.post(server.url + route, content=body, headers=headers or {}, timeout=60)
            else:
                r = httpx.post(server.url + route, json=body, timeout=60)
            assert r.status_code == 400, (name, r.status_code, r.text)
            assert_openai_error(r, 400, *words)
        assert sched.stats().running == 2, "the bad inputs ended before the innocent ones"
    finally:
        sched.observer.on_iteration = None
    for t in threads:
        t.join(300)
    assert out["sky"].json()["choices"][0]["message"]["content"] == ref_pipe.chat(SKY, max_new_tokens=40)
    assert out["sea"].json()["choices"][0]["message"]["content"] == ref_pipe.chat(SEA, max_new_tokens=30)
    wait_until(lambda: sched.kv_slots() == (0, SLOTS), 30, "free KV slots")


def test_the_edges_of_the_ranges_are_served(server):
    ok = [chat(temperature=2.0, seed=2**63 - 1), chat(temperature=0, seed=-2**63),
          chat(top_k=-1, temperature=1.0), chat(top_k=2**31 - 1, temperature=1.0)]
    for body in ok:
        r = httpx.post(server.url + CHAT, json=body, timeout=60)
        assert r.status_code == 200, (body, r.text)
    r = httpx.post(server.url + IMAGES, json={"prompt": "x", "size": "32x128",
                                              "num_inference_steps": 1}, timeout=60)
    assert r.status_code == 200, r.text
    # no Content-Type at all is read as JSON (curl --data-binary with no -H)
    r = httpx.post(server.url + CHAT, content=json.dumps(chat()).encode(), timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + CHAT, content=json.dumps(chat()).encode(), timeout=60,
                   headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_the_last_stream_chunk_carries_the_last_piece(server, ref_pipe):
    """As vLLM's streaming tests expect: the chunk with finish_reason "length" holds the last
    token's text, and the pieces join to the non-streamed answer."""
    pieces, last = [], None
    with httpx.stream("POST", server.url + CHAT, json=chat(SKY, 7, stream=True), timeout=60) as r:
        for line in r.iter_lines():
            if not line or line == "data: [DONE]":
                continue
            last = json.loads(line[len("data: "):])["choices"][0]
            if last["delta"].get("content"):
                pieces.append(last["delta"]["content"])
    assert last["finish_reason"] == "length" and last["delta"].get("content"), last
    assert "".join(pieces) == ref_pipe.chat(SKY, max_new_tokens=7)
