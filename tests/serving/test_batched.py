"""The batched scheduler behind a real server: chunked prefill, cancellation (during decode and
during a dream branch), admission limits, failures, metrics and readiness.

The model is the fast engine's CPU path on the tiny checkpoint (3 KV slots), so the slots counted
here are the engine's real static-cache slots. Expected texts come from the reference pipeline
(`ref_pipe`): the engine's greedy tokens equal the reference's (tests/parity/test_engine.py).
The scheduler's test hooks hold or slow its worker (an injected observer, `Observer.iteration`) and record what each iteration
ran (`trace`), so nothing here depends on timing luck.
"""
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
pytest.importorskip("prometheus_client", reason="the serving tests need prometheus-client")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")

from serving_helpers import LiveServer, Recorder, data_url, encode, scene, wait_until  # noqa: E402

from dreamllm_fast.config import EngineConfig  # noqa: E402
from dreamllm_fast.engine.decode import EngineDecodeBatch  # noqa: E402
from dreamllm_fast.pipeline import DreamLLMPipeline  # noqa: E402
from dreamllm_fast.serving import ServeConfig, create_app  # noqa: E402
from dreamllm_fast.serving.batched import BatchedScheduler  # noqa: E402

MODEL = "tiny"
SLOTS = 3
SKY = [{"role": "user", "content": "Tell me about the sky."}]
LONG = " ".join(["Please describe the little red house by the lake and the tree"] * 6)


def chat(messages=None, max_tokens=3, **extra):
    body = {"model": MODEL, "messages": messages or [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, "temperature": 0}
    body.update(extra)
    return body


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", backend="engine",
                                            progress=False,
                                            engine_config=EngineConfig(max_batch=SLOTS, precision="fp32"))


@pytest.fixture(scope="module")
def server(pipe):
    sched = BatchedScheduler(pipe, observer=Recorder(), max_batch=SLOTS, max_queue=2, warmup=False)
    with LiveServer(create_app(sched, ServeConfig(model_name=MODEL))) as srv:
        assert sched.wait_ready(60), sched.health()
        srv.sched = sched
        yield srv


@pytest.fixture(autouse=True)
def _reset(request):
    yield
    if "server" in request.fixturenames:
        s = request.getfixturevalue("server").sched
        s.observer.on_iteration, s.observer.trace, s.prefill_chunk = None, None, None
        wait_until(lambda: s.stats().running == 0 and s.stats().queue_depth == 0, 60, "an idle scheduler")
        assert s.kv_slots() == (0, SLOTS), "a test left KV slots held"


def post(server, body, path="/v1/chat/completions", **kw):
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def in_thread(fn, *args, **kwargs):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args, **kwargs)))
    t.start()
    return t, out


def metric(server, name) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def phase(sched, rid):
    return [p for r, _, p in sched.phases() if r == rid]


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(server, ref_pipe):
    """While a 338-token prompt is admitted 16 tokens per iteration, the running sequence gets a
    token between every two of its chunks; both answers equal the pipeline's."""
    sched = server.sched
    sched.prefill_chunk = 16
    sched.observer.trace = []
    sched.observer.on_iteration = lambda s: time.sleep(0.02)  # A (71 tokens) outlasts B's 22 chunks
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      json=chat(SKY, 70, stream=True)) as a:
        rid_a = a.headers["x-request-id"]
        lines = a.iter_lines()
        pieces = []
        while len(pieces) < 3:  # A is decoding
            ln = next(lines)
            if '"content":"' in ln and '"content":""' not in ln:
                pieces.append(ln)
        b, out = in_thread(post, server, chat([{"role": "user", "content": LONG}], 4))
        rest = [ln for ln in lines if ln]
    b.join(60)
    rid_b = out["r"].headers["x-request-id"]
    assert out["r"].json()["choices"][0]["message"]["content"] == ref_pipe.chat(
        [{"role": "user", "content": LONG}], max_new_tokens=4)
    assert rest[-1] == "data: [DONE]"
    trace = list(sched.observer.trace)
    chunks = [i for i, e in enumerate(trace) if e[0] == "prefill" and any(r == rid_b for r, _, _ in e[1])]
    sizes = [n for i in chunks for r, _, n in trace[i][1] if r == rid_b]
    n_prompt = len(ref_pipe.prompts.chat([{"role": "user", "content": LONG}]))
    assert sum(sizes) == n_prompt and len(chunks) == -(-n_prompt // 16) and max(sizes) <= 16
    for lo, hi in zip(chunks, chunks[1:]):  # between two chunks of B, A got a token
        got = [e for e in trace[lo:hi] if e[0] == "decode" and any(r == rid_a for r, _ in e[1])]
        assert got, f"A got no token between B's chunks at iterations {lo} and {hi}"


def test_a_client_that_disconnects_during_decode_frees_its_slot(server, ref_pipe):
    sched = server.sched
    sched.observer.on_iteration = lambda s: time.sleep(0.02)  # ~1.5 s for 60 tokens: A leaves long before
    before = sched.stats().requests["cancelled"]
    b, out = in_thread(post, server, chat(SKY, 30))
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      json=chat(SKY, 60, stream=True)) as a:
        rid = a.headers["x-request-id"]
        lines = a.iter_lines()
        for _ in range(6):
            next(lines)
        assert phase(sched, rid) == ["decode"]
        assert sched.kv_slots()[0] >= 1
        sched.observer.trace = []
    # the connection is closed: the request leaves the loop within an iteration or two
    wait_until(lambda: not phase(sched, rid), 30, "the request to leave")
    late = [r for e in sched.observer.trace if e[0] == "decode" for r, _ in e[1] if r == rid]
    assert len(late) <= 3, f"{len(late)} tokens decoded after the client left"
    assert sched.stats().requests["cancelled"] == before + 1
    b.join(60)
    assert out["r"].status_code == 200  # B was unaffected
    assert out["r"].json()["choices"][0]["message"]["content"] == ref_pipe.chat(SKY, max_new_tokens=30)
    wait_until(lambda: sched.kv_slots()[0] == 0, 10, "every slot back")
    assert metric(server, "dreamllm_kv_slots_used") == 0


def test_a_client_that_disconnects_during_a_dream_branch_frees_its_slot(server, ref_pipe):
    """An interleaved answer draws its image in 50 U-Net steps; the client leaves once it is
    drawing: the image stops within an iteration and the sequence's slot returns."""
    sched = server.sched
    sched.observer.trace = []
    b, out = in_thread(post, server, chat(SKY, 40))
    body = chat(SKY, 75, stream=True, modalities=["text", "image"], num_inference_steps=50)
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, json=body) as a:
        rid = a.headers["x-request-id"]
        wait_until(lambda: phase(sched, rid) == ["diffuse"], 60, "the image to start")
        assert sched.kv_slots()[0] >= 1  # its sequence keeps its slot while the image draws
    wait_until(lambda: not phase(sched, rid), 30, "the request to leave")
    steps = [s for e in sched.observer.trace if e[0] == "unet" for r, _, s in e[1] if r == rid]
    assert 0 < len(steps) < 10, steps  # it stopped drawing at once (50 steps were asked)
    b.join(60)
    assert out["r"].json()["choices"][0]["message"]["content"] == ref_pipe.chat(SKY, max_new_tokens=40)
    wait_until(lambda: sched.kv_slots()[0] == 0, 10, "every slot back")
    # the model is usable: the same interleaved answer, to the end, equals the pipeline's
    r = post(server, chat(SKY, 75, modalities=["text", "image"], num_inference_steps=2, seed=5))
    doc = ref_pipe.generate(SKY, max_new_tokens=75, num_inference_steps=2,
                            generator=torch.Generator().manual_seed(5))
    parts = r.json()["choices"][0]["message"]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    assert parts[0]["text"] == doc[0] and parts[2]["text"] == doc[2]


def test_full_queue_gets_429_and_a_queued_client_that_leaves_frees_its_place(server):
    sched = server.sched
    gate = threading.Event()
    sched.observer.on_iteration = lambda s: gate.wait(30)  # the worker holds before admitting anything
    try:
        a, out_a = in_thread(post, server, chat())
        wait_until(lambda: sched.stats().queue_depth == 1, 10, "A queued")
        before = sched.stats().requests["cancelled"]
        with pytest.raises(httpx.ReadTimeout):  # B gives up while queued, closing its connection
            httpx.post(server.url + "/v1/chat/completions", json=chat(),
                       timeout=httpx.Timeout(60, read=1.0))
        wait_until(lambda: sched.stats().queue_depth == 1, 10, "B's place to free")
        assert sched.stats().requests["cancelled"] == before + 1
        # max_queue (2) + max_batch (3) requests fit: the free slots take 3 at the next admission
        more = [in_thread(post, server, chat()) for _ in range(4)]
        wait_until(lambda: sched.stats().queue_depth == 5, 10, "C..F queued")
        r = post(server, chat())
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        assert metric(server, "dreamllm_queue_depth") == 5
    finally:
        gate.set()
    a.join(60)
    for t, _ in more:
        t.join(60)
    assert out_a["r"].status_code == 200
    assert [o["r"].status_code for _, o in more] == [200] * 4


def test_a_failure_in_one_requests_work_fails_only_that_request(server, pipe, ref_pipe, monkeypatch):
    sched = server.sched
    real = pipe.model.encode_images
    boom = threading.Event()

    def encode(pixels):
        if boom.is_set():
            boom.clear()
            raise RuntimeError("injected CLIP failure")
        return real(pixels)

    monkeypatch.setattr(pipe.model, "encode_images", encode)
    sched.observer.on_iteration = lambda s: time.sleep(0.01)
    b, out = in_thread(post, server, chat(SKY, 30))
    wait_until(lambda: sched.stats().running == 1, 10, "B running")
    boom.set()
    img = [{"type": "image_url", "image_url": {"url": data_url(encode_png())}},
           {"type": "text", "text": "What is this?"}]
    r = post(server, chat([{"role": "user", "content": img}], 5))
    assert r.status_code == 500 and "RuntimeError" in r.json()["error"]["message"]
    b.join(60)
    assert out["r"].json()["choices"][0]["message"]["content"] == ref_pipe.chat(SKY, max_new_tokens=30)
    r = post(server, chat([{"role": "user", "content": img}], 5))  # the same request now succeeds
    assert r.status_code == 200


def encode_png():
    return encode(scene())


def test_a_failed_decode_step_fails_its_sequences_and_the_server_keeps_serving(server, ref_pipe,
                                                                                monkeypatch):
    """The shared step raises while A decodes and C draws an image: A fails (its sequence was in
    the step), C (paused in its dream branch, not in the step) finishes equal to the pipeline."""
    sched = server.sched
    armed = threading.Event()
    real = EngineDecodeBatch.launch
    at_failure = []

    def launch(self):
        if armed.is_set():
            armed.clear()
            at_failure.extend(sched.phases())
            raise RuntimeError("injected decode-step failure")
        return real(self)

    monkeypatch.setattr(EngineDecodeBatch, "launch", launch)
    body = chat(SKY, 75, modalities=["text", "image"], num_inference_steps=20, seed=5)
    c, out_c = in_thread(post, server, body)
    wait_until(lambda: "diffuse" in [p for _, _, p in sched.phases()], 60, "C drawing its image")
    (rid_c,) = [r for r, _, p in sched.phases() if p == "diffuse"]
    sched.observer.on_iteration = lambda s: time.sleep(0.01)
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      json=chat(SKY, 60, stream=True)) as a:
        lines = a.iter_lines()
        next(lines)
        armed.set()
        got = [ln for ln in lines if ln]
    assert '"error"' in got[-2] and "RuntimeError" in got[-2] and got[-1] == "data: [DONE]"
    c.join(120)
    assert ("decode" in [p for r, _, p in at_failure if r != rid_c]
            and [p for r, _, p in at_failure if r == rid_c] == ["diffuse"]), at_failure
    doc = ref_pipe.generate(SKY, max_new_tokens=75, num_inference_steps=20,
                            generator=torch.Generator().manual_seed(5))
    r = out_c["r"].json()
    parts = r["choices"][0]["message"]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    assert parts[0]["text"] == doc[0] and parts[2]["text"] == doc[2]
    assert r["usage"]["completion_tokens"] == len(ref_pipe.last_token_ids())
    assert post(server, chat(SKY, 5)).json()["choices"][0]["message"]["content"] == \
        ref_pipe.chat(SKY, max_new_tokens=5)


def test_metrics_come_from_the_batched_scheduler(server):
    post(server, chat(SKY, 5))
    post(server, {"model": MODEL, "prompt": "a house", "num_inference_steps": 1, "seed": 1},
         "/v1/images/generations")
    text = httpx.get(server.url + "/metrics").text
    for name in ('dreamllm_queue_depth{scheduler="batched"}', "dreamllm_running_sequences",
                 "dreamllm_tokens_per_second", "dreamllm_kv_slots_used",
                 "dreamllm_time_to_first_token_seconds_bucket", "dreamllm_request_latency_seconds_bucket"):
        assert name in text, name
    for stage in ("encode", "prefill", "condition", "decode", "diffuse", "decode_latents"):
        assert f'dreamllm_stage_seconds_total{{scheduler="batched",stage="{stage}"}}' in text, stage
    assert metric(server, "dreamllm_kv_slots_total") == SLOTS
    assert metric(server, "dreamllm_generated_tokens_total") >= 5
    assert metric(server, "dreamllm_images_generated_total") >= 1
    assert metric(server, "dreamllm_tokens_per_second") > 0


def test_health_is_503_until_loaded_and_a_failed_load_is_reported(tiny_ckpt, tmp_path):
    release = threading.Event()

    def load():
        release.wait(30)
        return DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", progress=False)

    sched = BatchedScheduler(load, observer=Recorder(), warmup=True)
    with LiveServer(create_app(sched, ServeConfig(model_name=MODEL))) as srv:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert post(srv, chat()).status_code == 503
        release.set()
        assert sched.wait_ready(120)
        assert httpx.get(srv.url + "/health").json()["scheduler"] == "batched"
        assert post(srv, chat()).status_code == 200
    bad = BatchedScheduler(lambda: DreamLLMPipeline.from_pretrained(tmp_path / "nope"))
    with LiveServer(create_app(bad, ServeConfig(model_name=MODEL))) as srv:
        assert not bad.wait_ready(30) and bad.health().failed
        assert httpx.get(srv.url + "/health").json()["error"]["code"] == "model_failed"


def test_bad_settings_are_refused():
    from dreamllm_fast.errors import InvalidInputError

    for kw in ({"max_batch": 0}, {"max_queue": 0}, {"prefill_chunk": 0}, {"max_images": True}):
        with pytest.raises(InvalidInputError, match=next(iter(kw))):
            BatchedScheduler(lambda: None, **kw)


def test_images_of_one_request_share_a_u_net_call(server):
    """n = 3 images of one text-to-image request denoise together, one U-Net call per step."""
    sched = server.sched
    sched.observer.trace = []
    r = post(server, {"model": MODEL, "prompt": "a red house", "n": 3, "num_inference_steps": 2,
                      "seed": 4}, "/v1/images/generations")
    assert r.status_code == 200 and len(r.json()["data"]) == 3
    unet = [e[1] for e in sched.observer.trace if e[0] == "unet"]
    assert [len(u) for u in unet] == [3, 3]
    imgs = [np.asarray(x) for x in r.json()["data"]]
    assert len({str(i) for i in imgs}) == 3


def test_sampler_field_reaches_each_image_job(server, pipe):
    """`"sampler"` picks the image's diffusers scheduler; two images of one dpmpp-2m request step
    together (each keeping its own multistep history) and equal the pipeline's one-request images
    within 1 of 255 (rows batched in one U-Net call round differently: tests/parity/test_samplers.py).
    An unknown name is refused by the request model; on a plain chat request it is a 400."""
    from serving_helpers import decode_b64_png

    body = {"model": MODEL, "prompt": "a red house", "n": 2, "num_inference_steps": 3, "seed": 4,
            "size": "64x64", "sampler": "dpmpp-2m"}
    r = post(server, body, "/v1/images/generations")
    assert r.status_code == 200, r.text
    got = [np.asarray(decode_b64_png(d["b64_json"])).astype(int) for d in r.json()["data"]]
    for i, seed in enumerate((4, 5)):
        want = pipe.text_to_image("a red house", num_inference_steps=3, sampler="dpmpp-2m",
                                  generator=torch.Generator().manual_seed(seed), height=64,
                                  width=64)[0]
        assert np.abs(got[i] - np.asarray(want).astype(int)).max() <= 1
        ddpm = pipe.text_to_image("a red house", num_inference_steps=3,
                                  generator=torch.Generator().manual_seed(seed), height=64,
                                  width=64)[0]
        assert np.abs(got[i] - np.asarray(ddpm).astype(int)).max() > 1  # not the default sampler
    bad = post(server, {**body, "sampler": "euler"}, "/v1/images/generations")
    assert bad.status_code in (400, 422) and "sampler" in bad.text
    r = post(server, chat(SKY, 2, sampler="unipc"))
    assert r.status_code == 400 and "sampler" in r.text
