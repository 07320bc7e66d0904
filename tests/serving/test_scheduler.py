"""Admission, cancellation, readiness and metrics of the sequential scheduler behind a real server.

The model is the fast engine's CPU path on the tiny checkpoint, so the KV slots counted here are
the engine's real static-cache slots. `GatedPipeline` holds a call at its start (a busy worker
without timing games), slows streamed pieces, or injects a failure.
"""
import asyncio
import threading

import pytest

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
pytest.importorskip("prometheus_client", reason="the serving tests need prometheus-client")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")

from serving_helpers import GatedPipeline, LiveServer, wait_until  # noqa: E402

from dreamllm_fast.pipeline import DreamLLMPipeline  # noqa: E402
from dreamllm_fast.serving import (GenerationRequest, RequestHandle, SequentialScheduler,  # noqa: E402
                                   ServeConfig, TextDelta, create_app)
from dreamllm_fast.detokenize import StopStrings  # noqa: E402
from dreamllm_fast.serving.worker import RateMeter  # noqa: E402

MODEL = "tiny"


def chat(max_tokens=3, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "temperature": 0}
    body.update(extra)
    return body


@pytest.fixture(scope="module")
def gated(tiny_ckpt):
    pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32",
                                            backend="engine", progress=False)
    return GatedPipeline(pipe)


@pytest.fixture(scope="module")
def server(gated):
    sched = SequentialScheduler(gated, max_queue=1, warmup=False)
    with LiveServer(create_app(sched, ServeConfig(model_name=MODEL))) as srv:
        assert sched.wait_ready(60)
        srv.sched = sched
        yield srv


@pytest.fixture(autouse=True)
def _reset(request):
    if "gated" in request.fixturenames:
        g = request.getfixturevalue("gated")
        g.gate.set()
        g.piece_delay = 0.0
        g.fail_next = False
    yield


def kv_free(gated) -> int:
    return len(gated.model._free)


def metric(server, name) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_full_queue_gets_429_with_retry_after(server, gated):
    gated.gate.clear()
    gated.entered.clear()
    results = {}

    def call(name):
        results[name] = httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=60)

    a = threading.Thread(target=call, args=("a",))
    a.start()
    assert gated.entered.wait(10)  # A holds the worker
    b = threading.Thread(target=call, args=("b",))
    b.start()
    wait_until(lambda: server.sched.stats().queue_depth == 1, what="B queued")
    assert metric(server, "dreamllm_queue_depth") == 1 and metric(server, "dreamllm_running_sequences") == 1
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=60)
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "queue_full" and "--max-queue" in err["message"]
    gated.gate.set()
    a.join(30)
    b.join(30)
    assert results["a"].status_code == 200 and results["b"].status_code == 200
    assert server.sched.stats().queue_depth == 0 and server.sched.stats().requests["rejected"] >= 1


def test_streaming_client_that_disconnects_frees_its_slot(server, gated):
    total = gated.model.engine_config.max_batch
    assert kv_free(gated) == total
    gated.piece_delay = 0.05  # ~3 s for 60 tokens: the client leaves long before
    n_calls = len(gated.calls)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(60, stream=True),
                      timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk + a couple of pieces
        assert any('"content":"' in g for g in got)
        assert server.sched.stats().kv_slots_used == 1 and kv_free(gated) == total - 1
    # the connection is closed: the request is cancelled at the next token, the session closed
    wait_until(lambda: server.sched.stats().running == 0, what="the request to stop")
    rec = gated.calls[n_calls]
    assert rec["closed_early"] and not rec["finished"] and rec["pieces"] < 60
    assert kv_free(gated) == total and server.sched.stats().kv_slots_used == 0
    assert metric(server, "dreamllm_kv_slots_used") == 0
    assert server.sched.stats().requests["cancelled"] >= 1
    gated.piece_delay = 0.0
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_queued_client_that_disconnects_leaves_the_queue(server, gated):
    gated.gate.clear()
    gated.entered.clear()
    holder = threading.Thread(target=httpx.post, args=(server.url + "/v1/chat/completions",),
                              kwargs={"json": chat(), "timeout": 60})
    holder.start()
    assert gated.entered.wait(10)
    before = server.sched.stats().requests["cancelled"]
    with pytest.raises(httpx.ReadTimeout):  # gives up while queued, closing its connection
        httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=httpx.Timeout(60, read=1.0))
    wait_until(lambda: server.sched.stats().queue_depth == 0, what="the queue place to free")
    assert server.sched.stats().requests["cancelled"] == before + 1
    n_calls = len(gated.calls)
    gated.gate.set()
    holder.join(30)
    assert len(gated.calls) == n_calls  # the cancelled request never reached the model


def test_failure_inside_the_model_is_reported_and_the_server_keeps_serving(server, gated):
    gated.fail_next = True
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=60)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "RuntimeError" in r.json()["error"]["message"]
    gated.fail_next = True
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(stream=True),
                      timeout=60) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
    assert kv_free(gated) == gated.model.engine_config.max_batch
    assert httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=60).status_code == 200


def test_metrics_report_queue_tokens_latency_and_stages(server):
    httpx.post(server.url + "/v1/chat/completions", json=chat(5), timeout=60)
    text = httpx.get(server.url + "/metrics").text
    for name in ("dreamllm_queue_depth", "dreamllm_running_sequences", "dreamllm_tokens_per_second",
                 "dreamllm_kv_slots_used", "dreamllm_kv_slots_total",
                 "dreamllm_time_to_first_token_seconds_bucket", "dreamllm_request_latency_seconds_bucket",
                 'dreamllm_stage_seconds_total{scheduler="sequential",stage="prefill"}',
                 'dreamllm_stage_seconds_total{scheduler="sequential",stage="decode"}',
                 'dreamllm_http_requests_total{route="/v1/chat/completions",status="200"}'):
        assert name in text, name
    assert metric(server, "dreamllm_kv_slots_total") == 2  # the engine's static cache slots
    assert metric(server, "dreamllm_generated_tokens_total") >= 5
    assert metric(server, "dreamllm_tokens_per_second") > 0
    assert metric(server, "dreamllm_time_to_first_token_seconds_count") >= 1


def test_health_is_503_until_the_model_is_loaded(tiny_ckpt):
    release = threading.Event()

    def load():
        release.wait(30)
        return DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", progress=False)

    sched = SequentialScheduler(load, warmup=True)
    with LiveServer(create_app(sched, ServeConfig(model_name=MODEL))) as srv:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert "loading" in r.json()["error"]["message"] and r.headers["retry-after"] == "5"
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat())
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        release.set()
        assert sched.wait_ready(60)
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.post(srv.url + "/v1/chat/completions", json=chat(), timeout=60).status_code == 200


def test_a_model_that_fails_to_load_is_reported_unhealthy(tmp_path):
    sched = SequentialScheduler(lambda: DreamLLMPipeline.from_pretrained(tmp_path / "nope"))
    with LiveServer(create_app(sched, ServeConfig(model_name=MODEL))) as srv:
        assert not sched.wait_ready(30) and sched.health().failed
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed"
        assert "loading the model failed" in r.json()["error"]["message"]


# -- units --------------------------------------------------------------------------------------
def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["END", "xy"])
    out = [s.feed(p) for p in ["ab", "cE", "N", "Dzz"]]
    assert "".join(o for o, _ in out) == "abc" and out[-1][1] and s.stopped
    s = StopStrings(["END"])  # holds back len("END") - 1 characters that could start a match
    assert s.feed("aEN") == ("a", False) and s.feed("q") == ("E", False) and s.flush() == "Nq"
    s = StopStrings(["END"])
    text = "".join(s.feed(p)[0] for p in ["a", "EN", "q", "r"]) + s.flush()
    assert text == "aENqr" and not s.stopped
    s = StopStrings([])
    assert s.feed("END") == ("END", False) and s.flush() == ""


def test_rate_meter_window():
    m = RateMeter(window_s=10)
    m.add(50, now=100.0)
    m.add(30, now=105.0)
    assert m.rate(now=106.0) == 8.0 and m.rate(now=112.0) == 3.0 and m.rate(now=200.0) == 0.0


def test_handle_streams_events_across_threads_and_cancels_once():
    async def main():
        h = RequestHandle(GenerationRequest(kind="chat", seeds=[0]), prompt_tokens=3)
        seen = []
        h._on_cancel = seen.append
        t = threading.Thread(target=lambda: (h.emit(TextDelta(0, "a")), h.emit(TextDelta(0, "b")), h.close()))
        t.start()
        got = [ev.text async for ev in h]
        t.join()
        h.cancel()
        h.cancel()
        return got, seen, h

    got, seen, h = asyncio.run(main())
    assert got == ["a", "b"] and seen == [h] and h.cancelled
