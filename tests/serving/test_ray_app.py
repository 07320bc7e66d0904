"""ray_app.py without a Ray cluster: its arguments (and the CLI flags and the example config that
produce them), the Ray options it derives, `dreamllm-fast serve --ray`'s wiring (Ray's calls
replaced by recorders), and a replica's lifecycle: ready only once the engine is, check_health
raising once it is not. The cluster itself is tested in test_ray_serve.py."""
import asyncio
import importlib
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the Ray Serve tests need the 'ray' extra: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="the Ray Serve tests need ray[serve]")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")
yaml = pytest.importorskip("yaml", reason="ray[serve] brings PyYAML; the config file is YAML")

from pydantic import ValidationError  # noqa: E402
from serving_helpers import LiveServer  # noqa: E402

from dreamllm_fast import cli  # noqa: E402
from dreamllm_fast.errors import DreamLLMError  # noqa: E402
from dreamllm_fast.serving import Health, Scheduler  # noqa: E402
from dreamllm_fast.serving import ray_app  # noqa: E402
from dreamllm_fast.serving.ray_app import (DEPLOYMENT_NAME, REPLICA_HEADER,  # noqa: E402
                                           DreamLLMReplica, EngineUnhealthy, RayServeArgs,
                                           ReplicaStartError, build_app, make_deployment)

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "ray-serve.yaml"


# -- arguments and Ray options ---------------------------------------------------------------------
@pytest.mark.parametrize("bad,message", [
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas (3) is above max_replicas (2)"),
    ({"target_ongoing_requests": 2}, "target_ongoing_requests needs autoscaling"),
    ({"scheduler": "fastest"}, "unknown scheduler 'fastest'"),
    ({"replicas": 0}, "greater than or equal to 1"),
    ({"num_gpus": -1}, "greater than or equal to 0"),
    ({"replica": 2}, "Extra inputs are not permitted"),  # a typo in a config file
])
def test_bad_arguments_are_refused_with_the_reason(bad, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RayServeArgs(checkpoint="/m", **bad)


def test_deployment_options_fixed_and_autoscaling():
    fixed = RayServeArgs(checkpoint="/m", replicas=3, num_gpus=1, max_ongoing_requests=5)
    assert fixed.deployment_options() == {
        "num_replicas": 3, "max_ongoing_requests": 5,
        "ray_actor_options": {"num_gpus": 1.0, "num_cpus": 1.0}}
    d = make_deployment(fixed)
    assert d.name == DEPLOYMENT_NAME and d.num_replicas == 3 and d.max_ongoing_requests == 5
    assert d.ray_actor_options == {"num_gpus": 1.0, "num_cpus": 1.0}
    auto = RayServeArgs(checkpoint="/m", replicas=2, min_replicas=1, max_replicas=4,
                        target_ongoing_requests=3, num_gpus=0)
    opts = auto.deployment_options()
    assert "num_replicas" not in opts and opts["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 3}
    make_deployment(auto)  # Ray accepts it
    # Ray hands a batched replica twice its batch (a full batch and as many waiting), a
    # sequential one 8
    assert RayServeArgs(checkpoint="/m").deployment_options()["max_ongoing_requests"] == 16
    assert RayServeArgs(checkpoint="/m", max_batch=4).deployment_options()["max_ongoing_requests"] == 8
    assert RayServeArgs(checkpoint="/m", scheduler="sequential").deployment_options()[
        "max_ongoing_requests"] == 8
    # only one bound given: the other follows from the replica count
    assert RayServeArgs(checkpoint="/m", replicas=3, min_replicas=2).deployment_options()[
        "autoscaling_config"] == {"min_replicas": 2, "max_replicas": 3, "initial_replicas": 3}


def test_each_named_scheduler_is_built_as_the_cli_builds_it(tiny_ckpt):
    a = RayServeArgs(checkpoint=str(tiny_ckpt), device="cpu", backend="engine", max_batch=3,
                     prefill_chunk=64, image_batch=2, max_queue=5)
    sched = ray_app.make_request_scheduler(a)  # the default: batched
    assert (sched.name, sched.max_batch, sched.prefill_chunk, sched.max_images, sched.max_queue) == \
        ("batched", 3, 64, 2, 5)
    ec = sched._load().model.engine_config  # the replica's engine: 3 slots, graphs up to 3
    assert ec.max_batch == 3 and ec.cuda_graph_batch_sizes == (1, 2, 3)
    seq = ray_app.make_request_scheduler(a.model_copy(update={"scheduler": "sequential"}))
    assert seq.name == "sequential" and seq.max_queue == 5


def test_serve_config_matches_the_flags():
    a = RayServeArgs(checkpoint="/models/dreamllm-7b", max_body_mb=1, max_image_mb=2,
                     max_image_pixels=1000, max_input_images=3, allow_image_host=["img:80"],
                     image_fetch_timeout=4, max_n=5, max_image_side=512, max_aspect_ratio=3)
    c = a.serve_config("k")
    assert c.model_name == "dreamllm-7b" and c.api_key == "k" and c.max_n == 5
    assert c.max_body_bytes == 2**20 and c.media.max_image_bytes == 2 * 2**20
    assert c.media.max_image_pixels == 1000 and c.media.max_images == 3
    assert c.media.allowed_hosts == ("img:80",) and c.media.fetch_timeout_s == 4
    assert c.media.max_image_side == 512 and c.media.max_aspect_ratio == 3


def test_build_app_resolves_a_relative_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RayServeArgs(checkpoint="ckpt").resolved().checkpoint == str(tmp_path / "ckpt")
    assert type(build_app(RayServeArgs(checkpoint="ckpt"))).__name__ == "Application"


def test_the_example_config_is_a_valid_ray_serve_config():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(EXAMPLE.read_text())
    cfg = ServeDeploySchema.model_validate(raw)  # what `serve run` / `serve deploy` check
    (app,) = cfg.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert builder is build_app
    args = RayServeArgs.model_validate(app.args)  # every key is a builder argument
    assert Path(args.checkpoint).is_absolute()
    assert [d.name for d in app.deployments] == [DEPLOYMENT_NAME]  # overrides reach the deployment
    assert raw["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] == 1
    assert cfg.http_options.host == "127.0.0.1"
    build_app(app.args)


def test_every_serve_flag_has_its_ray_argument():
    """A flag added to `dreamllm-fast serve` must reach the replicas too (or be listed here)."""
    p = cli.build_parser()
    dests = set(vars(p.parse_args(["serve"]))) - {"command", "fn"}
    # header_timeout: uvicorn's own connection handling (a Ray Serve proxy has its own server)
    http_only = {"host", "port", "log_level", "ray", "ray_address", "no_warmup", "header_timeout"}
    assert dests - http_only <= set(RayServeArgs.model_fields), dests - set(RayServeArgs.model_fields)
    ns = p.parse_args(["serve", "--ray", "-c", "/m", "--replicas", "3", "--min-replicas", "1",
                       "--max-replicas", "5", "--max-ongoing-requests", "4", "--num-gpus", "0.5",
                       "--max-queue", "7", "--allow-image-host", "a:1", "--allow-image-host", "b",
                       "--no-warmup", "--model-name", "m", "--max-n", "2", "--dtype", "bf16"])
    a = ray_app.args_from_cli(ns)
    assert (a.replicas, a.min_replicas, a.max_replicas, a.max_ongoing_requests) == (3, 1, 5, 4)
    assert (a.num_gpus, a.max_queue, a.warmup, a.model_name, a.max_n, a.dtype) == \
        (0.5, 7, False, "m", 2, "bf16")
    assert a.allow_image_host == ["a:1", "b"] and a.checkpoint == "/m"


# -- `dreamllm-fast serve --ray`, with Ray's calls recorded ----------------------------------------
@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    rec = {"gpus": 0.0, "calls": []}
    monkeypatch.setattr(ray, "init", lambda **kw: rec["calls"].append(("init", kw)))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": rec["gpus"]})
    monkeypatch.setattr(serve, "start", lambda **kw: rec["calls"].append(("start", kw)))
    monkeypatch.setattr(serve, "run", lambda app, **kw: rec["calls"].append(("run", app, kw)))
    monkeypatch.setattr(serve, "delete", lambda name: rec["calls"].append(("delete", name)))
    monkeypatch.setattr(ray, "shutdown", lambda: rec["calls"].append(("ray.shutdown",)))
    real_build = ray_app.build_app

    def build(args):
        rec["args"] = args
        return real_build(args)

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_app, "build_app", build)
    monkeypatch.setattr(ray_app, "_wait_for_interrupt", interrupted)
    monkeypatch.delenv("DREAMLLM_API_KEY", raising=False)
    return rec


def test_cli_ray_on_a_cluster_without_gpus(fake_ray, tiny_ckpt, capsys):
    assert cli.main(["serve", "--ray", "-c", str(tiny_ckpt), "--port", "0", "--replicas", "2",
                     "--max-queue", "5", "--model-name", "m"]) == 0
    kinds = [c[0] for c in fake_ray["calls"]]
    # Ctrl-C: only this app is deleted, and the Ray instance started here stops
    assert kinds == ["init", "start", "run", "delete", "ray.shutdown"]
    assert fake_ray["calls"][3] == ("delete", "dreamllm")
    (_, init), (_, start), (_, app, run) = fake_ray["calls"][:3]
    assert init["address"] is None
    http = start["http_options"]
    assert http["host"] == "127.0.0.1" and http["port"] > 0  # --port 0: a free port
    assert run == {"name": "dreamllm", "route_prefix": "/"}
    a = fake_ray["args"]
    assert a.num_gpus == 0 and a.device == "cpu"  # no GPU in the cluster: CPU replicas
    assert a.replicas == 2 and a.max_queue == 5 and a.checkpoint == str(tiny_ckpt)
    out = capsys.readouterr().out
    assert f"on http://127.0.0.1:{http['port']} through Ray Serve (2 replica(s))" in out


def test_cli_ray_takes_one_gpu_per_replica_where_there_are_gpus(fake_ray, tiny_ckpt):
    fake_ray["gpus"] = 4.0
    assert cli.main(["serve", "--ray", "-c", str(tiny_ckpt), "--ray-address", "auto",
                     "--min-replicas", "1", "--max-replicas", "4", "--api-key", "k"]) == 0
    a = fake_ray["args"]
    assert a.num_gpus == 1 and a.device is None and a.api_key == "k"
    assert a.deployment_options()["autoscaling_config"]["max_replicas"] == 4
    assert fake_ray["calls"][0][1]["address"] == "auto"


@pytest.mark.parametrize("argv,gpus,message", [
    (["--num-gpus", "1"], 0.0, "this Ray cluster has no GPUs"),
    (["--num-gpus", "0", "--device", "cuda"], 2.0, "--device cuda with --num-gpus 0"),
    (["--min-replicas", "3", "--max-replicas", "2"], 0.0, "min_replicas (3) is above"),
])
def test_cli_ray_errors_are_one_line(fake_ray, tiny_ckpt, capsys, argv, gpus, message):
    fake_ray["gpus"] = gpus
    rc = cli.main(["serve", "--ray", "-c", str(tiny_ckpt), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not [c for c in fake_ray["calls"] if c[0] == "run"]


def test_cli_ray_without_the_extra(monkeypatch, tiny_ckpt, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "dreamllm_fast.serving.ray_app", None)
    assert cli.main(["serve", "--ray", "-c", str(tiny_ckpt)]) == 2
    assert "pip install 'dreamllm-fast[ray]'" in capsys.readouterr().err


# -- a replica's lifecycle, without Ray ------------------------------------------------------------
def _replica(**kw) -> DreamLLMReplica:
    r = DreamLLMReplica.__new__(DreamLLMReplica)
    asyncio.run(r.__init__(kw))
    return r


class _NeverReady(Scheduler):
    name = "never"
    shut = False

    def start(self):
        pass

    def health(self):
        return Health(False, "still capturing graphs")

    async def submit(self, request):
        raise AssertionError("not ready")

    def stats(self):
        raise AssertionError("not ready")

    def shutdown(self, timeout=10.0):
        _NeverReady.shut = True

    @property
    def max_context(self):
        return 0


def never_ready(load, args):
    return _NeverReady()


def not_a_scheduler(load, args):
    return object()


def test_replica_whose_engine_fails_to_load_does_not_start(tmp_path):
    with pytest.raises(ReplicaStartError, match="the engine did not start: loading the model "
                                                "failed") as e:
        _replica(checkpoint=str(tmp_path / "missing"), device="cpu", num_gpus=0)
    assert "missing" in str(e.value)  # the loader's own reason travels to Ray's log


def test_replica_waits_for_readiness_then_gives_up(tmp_path):
    _NeverReady.shut = False
    with pytest.raises(ReplicaStartError, match=r"not ready after ready_timeout_s=0.3 s "
                                                r"\(still capturing graphs\)"):
        _replica(checkpoint="/m", scheduler=f"{__name__}:never_ready", ready_timeout_s=0.3)
    assert _NeverReady.shut  # the engine is freed before Ray retries the replica


@pytest.mark.parametrize("name,message", [
    (f"{__name__}:not_a_scheduler", "returned object, not a dreamllm_fast.serving.Scheduler"),
    ("no_such_module_xyz:factory", "is its module installed on every node?"),
])
def test_bad_scheduler_factories(name, message):
    with pytest.raises(DreamLLMError, match=message):
        _replica(checkpoint="/m", scheduler=name)


def test_replica_serves_the_app_and_checks_its_engine(tiny_ckpt):
    r = _replica(checkpoint=str(tiny_ckpt), device="cpu", dtype="fp32", backend="reference",
                 model_name="tiny", num_gpus=0)
    assert r.scheduler.health().ready  # the constructor returned only once the engine was up
    r.check_health()
    app = r.__serve_build_asgi_app__()
    assert app.state.scheduler is r.scheduler
    with LiveServer(app) as srv:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 200 and h.headers[REPLICA_HEADER] == "local"
        m = httpx.get(srv.url + "/metrics").text
        assert 'dreamllm_replica_info{app="",deployment="",replica="local"} 1.0' in m
        page = httpx.get(srv.url + "/")  # the chat page (serving/webui.py) comes with the app
        assert page.status_code == 200 and "content-security-policy" in page.headers
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        own = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert own.headers.get_list("x-request-id") == [own.json()["id"]]
        # behind Ray's proxy (which set x-request-id and appends it) the app's own is dropped
        behind = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60,
                            headers={"x-request-id": "ray-1"})
        assert behind.status_code == 200 and behind.headers.get_list("x-request-id") == []
    r.scheduler.shutdown()  # as an engine that died: not ready any more
    with pytest.raises(EngineUnhealthy, match="replica local: the engine is not ready: shut down"):
        r.check_health()
    r.__del__()
    assert r.scheduler is None
