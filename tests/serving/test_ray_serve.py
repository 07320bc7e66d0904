"""Ray Serve end to end on the CPU: the example config file (deploy/ray-serve.yaml) deployed with
`serve run` on a local Ray instance, 2 replicas of the tiny checkpoint (num_gpus 0), driven by the
official `openai` client on 127.0.0.1.

- answers (chat, seeded sampling, image input, streamed chat, a streamed interleaved answer,
  images) equal those of a single `dreamllm-fast serve`-style server on the same checkpoint and
  seeds: the same app, so whole JSON bodies are compared (only `id` and `created` differ) and SSE
  streams line by line;
- requests land on both replicas (``x-dreamllm-replica`` counted; /metrics names its replica);
- a replica actor killed with `ray.kill` (found with `ray.util.list_named_actors`): requests keep
  succeeding on the other, and Ray Serve starts a new replica (serve.status());
- a replica whose engine fails is reported unhealthy by `check_health` and replaced by Ray.

One Ray instance for the module (start-up costs tens of seconds on 2 cores), shut down at the
end. Every wait is bounded.
"""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray", reason="the Ray Serve tests need the 'ray' extra: "
                                        "pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="the Ray Serve tests need ray[serve]")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
openai = pytest.importorskip("openai", reason="the serving tests drive the server with the openai client")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")
yaml = pytest.importorskip("yaml", reason="ray[serve] brings PyYAML; the config file is YAML")

from ray_helpers import FLAGS_ENV  # noqa: E402
from serving_helpers import LiveServer, data_url, encode, scene  # noqa: E402

from dreamllm_fast.serving import ServeConfig, create_app  # noqa: E402
from dreamllm_fast.serving.factory import build_scheduler  # noqa: E402
from dreamllm_fast.serving.ray_app import (APP_NAME, DEPLOYMENT_NAME, REPLICA_HEADER,  # noqa: E402
                                           RayServeArgs, make_deployment)

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[1] / "deploy" / "ray-serve.yaml"
MODEL = "tiny"
TEXT = [{"role": "user", "content": "Tell me about the sky."}]
WAIT_S = 240  # any one wait for Ray (replica start on 2 busy cores: ~20 s measured)
REPLICA_PREFIX = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
TIMES: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, what: str, timeout: float = WAIT_S, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _deployment(app: str = APP_NAME):
    a = serve.status().applications.get(app)
    return a, (a.deployments.get(DEPLOYMENT_NAME) if a else None)


def _steady(app: str, n: int) -> bool:
    a, d = _deployment(app)
    return bool(a and d and a.status == "RUNNING" and d.status == "HEALTHY"
                and d.replica_states == {"RUNNING": n})


def _replica_actors(app: str = APP_NAME) -> set:
    """Replica ids, from the names of the live replica actors (Ray's public API)."""
    prefix = f"SERVE_REPLICA::{app}#{DEPLOYMENT_NAME}#"
    return {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    flags = tmp_path_factory.mktemp("ray_flags")
    t0 = time.monotonic()
    # address="local": a fresh instance, never a cluster someone else started on this machine.
    # The replicas import ray_helpers (the failing engine) from this folder.
    pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False,
             object_store_memory=100 * 2**20, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, FLAGS_ENV: str(flags)}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    TIMES["ray_start"] = time.monotonic() - t0
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, flags=flags,
                          address=ray.get_runtime_context().gcs_address)
    t0 = time.monotonic()
    serve.shutdown()
    ray.shutdown()
    TIMES["ray_stop"] = time.monotonic() - t0
    print("\nRay Serve test timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def deployed(cluster, tiny_ckpt, tmp_path_factory):
    """deploy/ray-serve.yaml, with what a CPU test must change, run with `serve run`."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["http_options"]["port"] = cluster.port
    (app,) = cfg["applications"]
    app["args"].update(checkpoint=str(tiny_ckpt), device="cpu", dtype="fp32", backend="reference",
                       model_name=MODEL, max_queue=8, max_temperature=8.0)
    (dep,) = app["deployments"]
    dep["autoscaling_config"].update(min_replicas=2, initial_replicas=2, max_replicas=2)
    dep["ray_actor_options"]["num_gpus"] = 0
    dep["health_check_period_s"] = 1  # notice the killed replica within a second
    path = tmp_path_factory.mktemp("ray_cfg") / "ray-serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.monotonic()
    # `serve run` (the console script's module, so no PATH lookup), joining this instance
    r = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "run", "--address",
                        cluster.address, "--non-blocking", str(path)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _wait(lambda: _steady(APP_NAME, 2), "2 RUNNING replicas of the example config")
    TIMES["deploy_2_replicas"] = time.monotonic() - t0
    return cluster


@pytest.fixture(scope="module")
def single(tiny_ckpt):
    """The one-process server (what `dreamllm-fast serve` runs) on the same checkpoint.

    It computes with one intra-op thread, as the replicas do (Ray sets OMP_NUM_THREADS to an
    actor's num_cpus, 1 here): with 2 threads fp32 reductions split differently, and the
    interleaved answer's image differed by 1/255 on 0.008% of its pixels (measured on this
    2-core CPU), which would hide nothing about Ray but break the byte-for-byte comparison."""
    import torch

    from dreamllm_fast.pipeline import DreamLLMPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32",
                                                backend="reference", progress=False)
        args = yaml.safe_load(EXAMPLE.read_text())["applications"][0]["args"]  # the replicas'
        sched = build_scheduler(args["scheduler"], lambda engine_config=None: pipe, max_queue=8,
                                max_batch=args.get("max_batch"))
        with LiveServer(create_app(sched, ServeConfig(model_name=MODEL, max_temperature=8.0))) as srv:
            assert sched.wait_ready(60), sched.health()
            yield srv
    finally:
        torch.set_num_threads(threads)


SEEN: list = []  # replica ids that answered, over the whole module


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _both(deployed, single, call):
    """call(client) through Ray and through the single server; the raw responses."""
    got = call(_client(deployed.url).with_raw_response)
    want = call(_client(single.url).with_raw_response)
    assert got.status_code == 200 and got.headers.get_list("x-request-id")  # Ray's id, once
    assert len(got.headers.get_list("x-request-id")) == 1
    SEEN.append(got.headers[REPLICA_HEADER])
    return got, want


def _strip(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


CHAT_CASES = {
    "greedy": dict(messages=[{"role": "system", "content": "You are terse."}] + TEXT,
                   max_tokens=12, temperature=0),
    # T = 8 (both servers run with --max-temperature 8): the tiny model's walk is so peaked that
    # T <= 2 samples the greedy text
    "seeded_n2": dict(messages=TEXT, max_tokens=10, temperature=8.0, top_p=0.95, seed=123, n=2),
    "image_input": dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(encode(scene()))}},
        {"type": "text", "text": "What is in this picture?"}]}], max_tokens=6, temperature=0),
}


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_equals_single_server(deployed, single, case):
    got, want = _both(deployed, single, lambda c: c.chat.completions.create(
        model=MODEL, **CHAT_CASES[case]))
    g, w = got.parse(), want.parse()
    assert g.choices[0].message.content  # not an empty answer compared with another
    assert _strip(g.model_dump()) == _strip(w.model_dump())
    if case == "seeded_n2":
        assert g.choices[0].message.content != g.choices[1].message.content


def _sse(url: str, body: dict) -> tuple[list, httpx.Headers]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
        return lines, r.headers


def _normalized(lines: list) -> list:
    out = []
    for ln in lines:
        if ln.startswith("data: {"):
            d = json.loads(ln[6:])
            ln = "data: " + json.dumps(_strip(d), sort_keys=True)
        out.append(ln)
    return out


STREAM_CASES = {
    "chat": {"messages": TEXT, "max_tokens": 20, "temperature": 0, "stream": True,
             "stream_options": {"include_usage": True}},
    # the tiny walk draws one image here: it crosses Ray's proxy as one SSE event of ~KBs
    "interleaved": {"messages": TEXT, "max_tokens": 75, "temperature": 0, "stream": True,
                    "modalities": ["text", "image"], "num_inference_steps": 2,
                    "guidance_scale": 3.0, "seed": 5},
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_streams_pass_through_unchanged(deployed, single, case):
    body = {"model": MODEL, **STREAM_CASES[case]}
    got, headers = _sse(deployed.url, body)
    want, _ = _sse(single.url, body)
    SEEN.append(headers[REPLICA_HEADER])
    assert headers["content-type"].startswith("text/event-stream")
    assert got[-2:] == ["data: [DONE]", ""] and len(got) > 10
    assert _normalized(got) == _normalized(want)
    if case == "interleaved":
        assert any('"image_url"' in ln for ln in got)
    # and through the openai client: the same pieces
    def pieces(url):
        kw = {k: v for k, v in STREAM_CASES[case].items() if k not in ("stream", "modalities",
              "num_inference_steps", "guidance_scale", "seed")}
        extra = {k: v for k, v in STREAM_CASES[case].items() if k in ("modalities",
                 "num_inference_steps", "guidance_scale", "seed")}
        return [c.choices[0].delta.content for c in _client(url).chat.completions.create(
            model=MODEL, stream=True, extra_body=extra, **kw) if c.choices]
    got_pieces = pieces(deployed.url)
    assert got_pieces == pieces(single.url) and any(got_pieces)


def test_image_generation_equals_single_server(deployed, single):
    got, want = _both(deployed, single, lambda c: c.images.generate(
        model=MODEL, prompt="a red house under a yellow sun", n=2, size="64x64",
        response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 3, "guidance_scale": 5.0}))
    g, w = got.parse(), want.parse()
    assert len(g.data) == 2 and g.data[0].b64_json != g.data[1].b64_json
    assert [d.b64_json for d in g.data] == [d.b64_json for d in w.data]


def _chat_once(url: str) -> str:
    r = _client(url).chat.completions.with_raw_response.create(
        model=MODEL, messages=TEXT, max_tokens=2, temperature=0)
    assert r.status_code == 200 and r.parse().choices[0].message.content
    return r.headers[REPLICA_HEADER]


def _concurrent(url: str, n: int) -> list:
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        return list(ex.map(lambda _: _chat_once(url), range(n)))


def test_requests_land_on_both_replicas(deployed):
    replicas = _replica_actors()
    assert len(replicas) == 2
    # Ray's router picks the less busy of two replicas: concurrent requests spread. Bounded.
    for _ in range(5):
        SEEN.extend(_concurrent(deployed.url, 4))
        if replicas <= set(SEEN):
            break
    assert set(SEEN) == replicas, (SEEN, replicas)
    counts = {r: SEEN.count(r) for r in replicas}
    print(f"\nanswers per replica: {counts}")
    # /metrics names the replica that answered the scrape
    r = httpx.get(deployed.url + "/metrics", timeout=30)
    line = next(ln for ln in r.text.splitlines() if ln.startswith("dreamllm_replica_info{"))
    assert f'replica="{r.headers[REPLICA_HEADER]}"' in line and f'app="{APP_NAME}"' in line


def test_killed_replica_is_replaced_and_the_other_keeps_serving(deployed):
    before = _replica_actors()
    assert len(before) == 2 and _steady(APP_NAME, 2)
    victim = sorted(before)[0]
    (survivor,) = before - {victim}
    t0 = time.monotonic()
    ray.kill(ray.get_actor(REPLICA_PREFIX + victim, namespace="serve"), no_restart=True)
    # New requests succeed, on the survivor, while Ray notices and starts a replacement.
    answered = [_chat_once(deployed.url) for _ in range(3)]
    answered += _concurrent(deployed.url, 3)
    assert set(answered) == {survivor}, answered
    states = []

    def replaced():
        _, d = _deployment()
        states.append(dict(d.replica_states) if d else None)
        now = _replica_actors()
        return victim not in now and len(now) == 2 and _steady(APP_NAME, 2) and now
    after = _wait(replaced, "Ray Serve to replace the killed replica")
    TIMES["replace_killed_replica"] = time.monotonic() - t0
    (new,) = after - before
    assert survivor in after
    # serve.status() showed the replacement starting before it ran
    assert any(s and s.get("STARTING") for s in states), states
    # the new replica serves
    seen = set()
    for _ in range(5):
        seen |= set(_concurrent(deployed.url, 4))
        if new in seen:
            break
    assert new in seen, seen


def test_failed_engine_is_unhealthy_and_replaced(cluster, tiny_ckpt):
    """A replica whose engine fails after start: its check_health raises, Ray stops it and starts
    a new one. A second app (1 replica, health checked every second) with a scheduler whose
    engine fails on demand (ray_helpers.py)."""
    app, prefix = "dreamllm-faults", "/faults"
    args = RayServeArgs(checkpoint=str(tiny_ckpt), device="cpu", dtype="fp32",
                        backend="reference", model_name=MODEL, num_gpus=0, warmup=False,
                        scheduler="ray_helpers:failing_scheduler")
    t0 = time.monotonic()
    serve.run(make_deployment(args).options(health_check_period_s=1).bind(args.model_dump()),
              name=app, route_prefix=prefix)
    try:
        assert _steady(app, 1)
        url = cluster.url + prefix
        r = httpx.get(url + "/health", timeout=30)
        assert r.status_code == 200 and r.json()["scheduler"] == "failable"
        (first,) = _replica_actors(app)
        assert r.headers[REPLICA_HEADER] == first
        (cluster.flags / "fail-next").touch()
        statuses = []

        def replaced():
            a, d = _deployment(app)
            statuses.append((a.status, d.status) if d else None)
            now = _replica_actors(app)
            return first not in now and len(now) == 1 and _steady(app, 1) and now
        (second,) = _wait(replaced, "Ray Serve to replace the replica whose engine failed")
        TIMES["replace_unhealthy_replica"] = time.monotonic() - t0
        assert (cluster.flags / f"failed-{first}").exists()  # that replica's engine failed
        assert ("UNHEALTHY", "UNHEALTHY") in statuses, statuses  # and Ray said so
        r = httpx.get(url + "/health", timeout=30)
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == second
        assert _chat_once(url) == second
    finally:
        serve.delete(app)
