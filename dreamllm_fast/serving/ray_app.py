"""Ray Serve: replicas of the OpenAI server behind one endpoint (the optional extra ``ray``).

Each replica is one Ray actor that owns one GPU (``ray_actor_options={"num_gpus": 1}``), one
pipeline and one scheduler, and serves the very app of `dreamllm-fast serve`: `app.create_app` is
mounted through Ray's late-bound ingress (`serve.ingress()` + ``__serve_build_asgi_app__``, which
Ray calls in the replica after the constructor), so there is no second copy of the routes and
streamed answers (SSE) are the app's own bytes. Ray Serve adds what one process cannot: replicas
placed on GPUs across nodes, autoscaling, replacing dead or unhealthy replicas, rolling updates.

    dreamllm-fast serve --ray --checkpoint DIR --replicas 2         # CLI (cli.py -> serve_on_ray)
    serve run deploy/ray-serve.yaml                                   # Ray's config file
    serve run dreamllm_fast.serving.ray_app:build_app checkpoint=DIR replicas=2

Lifecycle of a replica, as Ray Serve sees it:
- starting: the async constructor starts the scheduler (weights load and warm-up run on its worker
  thread) and waits, without blocking the replica's event loop, until `Scheduler.health()` is
  ready; Ray routes nothing to a replica before its constructor returns and its first
  `check_health` passes, so "ready" means weights and graphs are up. A load that fails (or takes
  longer than `ready_timeout_s`) raises; Ray retries the replica and marks the deployment failed
  after `max_constructor_retry_count` tries.
- running: Ray calls `check_health` every `health_check_period_s` (10 s by default); it raises
  when the scheduler is no longer ready (its engine failed), and Ray then stops the replica and
  starts a new one. A replica whose actor dies is replaced the same way.
- Every response carries ``x-dreamllm-replica`` (the replica's Ray id) and /metrics has
  ``dreamllm_replica_info{replica=...}``, so a client or a scrape can tell the replicas apart.

Args (`RayServeArgs`) use the names of `dreamllm-fast serve`'s flags (``max_queue``,
``allow_image_host``, ...), plus the Ray knobs: ``replicas``, ``min_replicas``/``max_replicas``
(autoscaling bounds), ``max_ongoing_requests``, ``num_gpus``, ``num_cpus``.
"""
import asyncio
import importlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve

from ..errors import DreamLLMError
from .media import MediaLimits
from .protocol import ServeConfig
from .factory import DEFAULT_MAX_BATCH, SCHEDULER_NAMES, build_scheduler, pipeline_loader
from .scheduler import Scheduler
from .security import API_KEY_ENV

log = logging.getLogger("dreamllm_fast.serving")

APP_NAME = "dreamllm"
DEPLOYMENT_NAME = "DreamLLMServer"
REPLICA_HEADER = "x-dreamllm-replica"


class RayServeArgs(BaseModel):
    """What a replica needs (one pipeline, one scheduler, the HTTP limits) and how Ray places
    and scales the replicas. The builder argument of `build_app` (Ray validates the ``args:`` of
    a config file against it); field names follow `dreamllm-fast serve`'s flags."""

    model_config = ConfigDict(extra="forbid")

    # -- the model: a path every node that may run a replica can read. Absolute in a config
    # file (Ray builds those apps in its controller, whose working directory is not yours); a
    # relative one from the CLI or `serve run module:build_app` is resolved where it was typed.
    checkpoint: str
    device: Optional[str] = None  # None: cuda when the replica sees a GPU, else cpu
    dtype: Optional[str] = None
    backend: Optional[str] = None
    unet_backend: str = "eager"
    vae_backend: str = "eager"
    weights: Optional[Literal["bf16", "int8", "fp8"]] = None  # --weights; None: as the checkpoint stores them
    # -- the scheduler of each replica: a name in SCHEDULERS or "package.module:factory"
    scheduler: str = "batched"
    max_batch: Optional[int] = Field(None, ge=1)  # batched: sequences at once (default 8)
    prefill_chunk: Optional[int] = Field(None, ge=1)  # batched: tokens per prefill pass
    image_batch: Optional[int] = Field(None, ge=1)  # batched: images denoised together
    max_queue: int = Field(64, ge=1)
    warmup: bool = True
    ready_timeout_s: float = Field(1800.0, gt=0)  # load + warm-up + graph capture, per replica
    # -- HTTP (ServeConfig); api_key None: $DREAMLLM_API_KEY in the replica's environment
    model_name: Optional[str] = None
    api_key: Optional[str] = None
    max_body_mb: float = Field(32.0, gt=0)
    max_n: int = Field(8, ge=1)
    max_image_mb: float = Field(16.0, gt=0)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_image_side: int = Field(4096, ge=1)
    max_aspect_ratio: float = Field(20.0, ge=1)
    max_input_images: Optional[int] = Field(None, ge=0)  # None: as many as fit the context
    body_timeout: float = Field(30.0, gt=0)
    max_temperature: float = Field(2.0, ge=0)
    allow_image_host: list[str] = []
    image_fetch_timeout: float = Field(10.0, gt=0)
    # -- Ray: placement and scaling
    replicas: int = Field(1, ge=1)  # fixed count; the initial count when autoscaling
    min_replicas: Optional[int] = Field(None, ge=0)
    max_replicas: Optional[int] = Field(None, ge=1)
    target_ongoing_requests: Optional[float] = Field(None, gt=0)
    # Requests Ray hands one replica at once; the rest wait in Ray's proxy, which then routes
    # each to the least-loaded replica. Default: twice the batch for the batched scheduler (a
    # full batch runs and as many wait in the replica to take freed slots at once), 8 for the
    # sequential one (one runs, the others wait there).
    max_ongoing_requests: Optional[int] = Field(None, ge=1)
    num_gpus: float = Field(1.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.min_replicas is not None and self.max_replicas is not None \
                and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas "
                             f"({self.max_replicas})")
        if self.target_ongoing_requests is not None and not self.autoscaling:
            raise ValueError("target_ongoing_requests needs autoscaling: set max_replicas "
                             "(and min_replicas)")
        if self.scheduler not in SCHEDULERS and ":" not in self.scheduler:
            raise ValueError(f"unknown scheduler {self.scheduler!r}: use one of "
                             f"{sorted(SCHEDULERS)} or an import path 'package.module:factory'")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def resolved(self) -> "RayServeArgs":
        """A copy with an absolute checkpoint path (replicas run in other working directories;
        resolved where the app is built: the driver of `serve run` or of the CLI)."""
        path = Path(self.checkpoint).expanduser().resolve()
        return self.model_copy(update={"checkpoint": str(path)})

    def serve_config(self, api_key: Optional[str]) -> ServeConfig:
        """The HTTP settings, exactly as `dreamllm-fast serve` builds them from its flags."""
        return ServeConfig(
            model_name=self.model_name or Path(self.checkpoint).name, api_key=api_key,
            max_body_bytes=int(self.max_body_mb * 2**20), max_n=self.max_n,
            body_timeout_s=self.body_timeout, max_temperature=self.max_temperature,
            media=MediaLimits(max_image_bytes=int(self.max_image_mb * 2**20),
                              max_image_pixels=self.max_image_pixels,
                              max_images=self.max_input_images,
                              max_image_side=self.max_image_side,
                              max_aspect_ratio=self.max_aspect_ratio,
                              allowed_hosts=tuple(self.allow_image_host),
                              fetch_timeout_s=self.image_fetch_timeout))

    def deployment_options(self) -> dict:
        """`serve.deployment(...)` options. A config file's ``deployments:`` entry overrides
        them (Ray's rule), e.g. to tune health checks."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests or (
                2 * (self.max_batch or DEFAULT_MAX_BATCH) if self.scheduler == "batched" else 8),
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
        }
        if self.autoscaling:
            lo = self.min_replicas if self.min_replicas is not None else 1
            hi = self.max_replicas if self.max_replicas is not None else max(lo, self.replicas)
            auto: dict[str, Any] = {"min_replicas": lo, "max_replicas": hi,
                                    "initial_replicas": min(max(self.replicas, lo), hi)}
            if self.target_ongoing_requests is not None:
                auto["target_ongoing_requests"] = self.target_ongoing_requests
            opts["autoscaling_config"] = auto
        else:
            opts["num_replicas"] = self.replicas
        return opts


# -- schedulers ------------------------------------------------------------------------------------
def _named(name: str) -> Callable[[Callable[..., Any], "RayServeArgs"], Scheduler]:
    def factory(load: Callable[..., Any], args: "RayServeArgs") -> Scheduler:
        return build_scheduler(name, load, max_queue=args.max_queue, max_batch=args.max_batch,
                               prefill_chunk=args.prefill_chunk, image_batch=args.image_batch,
                               warmup=args.warmup, device=args.device, dtype=args.dtype)

    return factory


# name -> factory(load, args) -> Scheduler; `load(engine_config=None)` returns the replica's
# DreamLLMPipeline (the batched scheduler passes the engine's slot and graph sizes).
SCHEDULERS: dict[str, Callable[[Callable[..., Any], RayServeArgs], Scheduler]] = {
    name: _named(name) for name in SCHEDULER_NAMES}


def make_request_scheduler(args: RayServeArgs) -> Scheduler:
    """The replica's scheduler (not started). A custom one is named "package.module:factory",
    called as ``factory(load, args)``, and must implement `scheduler.Scheduler`."""
    factory = SCHEDULERS.get(args.scheduler)
    if factory is None:
        module, _, attr = args.scheduler.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise DreamLLMError(f"cannot load the scheduler factory {args.scheduler!r} in this "
                                f"replica ({e}); is its module installed on every node?") from None

    sched = factory(pipeline_loader(args), args)
    if not isinstance(sched, Scheduler):
        raise DreamLLMError(f"the scheduler factory {args.scheduler!r} returned "
                            f"{type(sched).__name__}, not a dreamllm_fast.serving.Scheduler")
    return sched


# -- the replica -----------------------------------------------------------------------------------
class ReplicaStartError(DreamLLMError):
    """The replica's engine did not become ready (Ray retries the replica)."""


class EngineUnhealthy(DreamLLMError):
    """Raised by `check_health`: Ray Serve stops this replica and starts a new one."""


class _ReplicaHeader:
    """Names the replica on every response (pure ASGI: streamed bodies pass untouched).

    Ray's proxy gives every request an ``x-request-id`` (the client's own, or a new one) and
    appends it to the response; the app's own ``x-request-id`` would make that header appear
    twice, so in a replica Ray's id is the one kept (it is the id in Ray's replica logs; the
    OpenAI ``id`` stays in the body)."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ray_id = any(k == b"x-request-id" for k, _ in scope.get("headers", ()))

        async def send_with_header(msg):
            if msg["type"] == "http.response.start":
                headers = [(k, v) for k, v in msg.get("headers", [])
                           if not (ray_id and k.lower() == b"x-request-id")]
                msg = {**msg, "headers": [*headers, self.header]}
            await send(msg)

        await self.app(scope, receive, send_with_header)


def _replica_identity() -> tuple[str, str, str]:
    """(app, deployment, replica id) from Ray's replica context; ("", "", "local") outside Ray."""
    from ray.serve.exceptions import RayServeException

    try:
        ctx = serve.get_replica_context()
    except RayServeException:  # constructed outside a Ray Serve replica (unit tests)
        return "", "", "local"
    return ctx.app_name, ctx.deployment, ctx.replica_id.unique_id


class DreamLLMReplica:
    """One replica: one scheduler (hence one pipeline, on this actor's GPU) and the server app.
    Wrapped by Ray in `make_deployment`; plain Python here, so its lifecycle is testable
    without a cluster."""

    async def __init__(self, args: Union[dict, RayServeArgs]):
        self.args = RayServeArgs.model_validate(args)
        self.app_name, self.deployment_name, self.replica_id = _replica_identity()
        # Resolved here, in the replica's environment, so a key need not travel in the config.
        self.api_key = self.args.api_key or os.environ.get(API_KEY_ENV) or None
        self.scheduler = make_request_scheduler(self.args)
        self.scheduler.start()
        t0 = time.monotonic()
        deadline = t0 + self.args.ready_timeout_s
        while True:
            h = self.scheduler.health()
            if h.ready:
                break
            if h.failed or time.monotonic() > deadline:
                await asyncio.to_thread(self.scheduler.shutdown)
                why = h.detail if h.failed else \
                    f"not ready after ready_timeout_s={self.args.ready_timeout_s:g} s ({h.detail})"
                raise ReplicaStartError(f"replica {self.replica_id}: the engine did not start: "
                                        f"{why}")
            await asyncio.sleep(0.05)  # the replica's event loop stays free meanwhile
        log.info("replica %s ready in %.1f s (%s scheduler)", self.replica_id,
                 time.monotonic() - t0, self.scheduler.name)

    def __serve_build_asgi_app__(self):
        """Called by Ray in the replica after the constructor: the one app of the project."""
        from prometheus_client import Info

        from .app import create_app, lower_pillow_guard

        cfg = self.args.serve_config(self.api_key)
        lower_pillow_guard(cfg.media.max_image_pixels)  # this process is a server
        app = create_app(self.scheduler, cfg, manage_scheduler=False)
        app.add_middleware(_ReplicaHeader, replica=self.replica_id)
        Info("dreamllm_replica", "the Ray Serve replica that answered this scrape",
             registry=app.state.metrics.registry).info(
            {"app": self.app_name, "deployment": self.deployment_name, "replica": self.replica_id})
        return app

    def check_health(self) -> None:
        """Ray's periodic health check: raising marks this replica unhealthy and Ray replaces
        it. Ready is checked, not just "not failed": the constructor returned only once the
        scheduler was ready, so any later not-ready state is a broken engine."""
        h = self.scheduler.health()
        if not h.ready:
            raise EngineUnhealthy(f"replica {self.replica_id}: the engine is not ready: {h.detail}")

    def __del__(self):
        # Ray calls this on graceful shutdown (scale-down, redeploy): cancel the queued and
        # running requests and free the model before the actor exits.
        sched = getattr(self, "scheduler", None)
        if sched is not None:
            self.scheduler = None
            sched.shutdown(timeout=5.0)


_ingress = serve.ingress()(DreamLLMReplica)  # late-bound: the app comes from the replica


def make_deployment(args: Union[dict, RayServeArgs]):
    """The Ray Serve deployment with `args`' placement and scaling (bind it with ``args``)."""
    args = RayServeArgs.model_validate(args)
    return serve.deployment(_ingress, name=DEPLOYMENT_NAME, **args.deployment_options())


def build_app(args: RayServeArgs):
    """Ray Serve application builder (``import_path: dreamllm_fast.serving.ray_app:build_app``
    with ``args:``, or ``serve run dreamllm_fast.serving.ray_app:build_app checkpoint=DIR``)."""
    args = RayServeArgs.model_validate(args).resolved()
    return make_deployment(args).bind(args.model_dump())


# -- `dreamllm-fast serve --ray` -------------------------------------------------------------------
def args_from_cli(ns) -> RayServeArgs:
    """`RayServeArgs` from the parsed flags of `dreamllm-fast serve` (same names)."""
    fields = {k: getattr(ns, k) for k in RayServeArgs.model_fields
              if getattr(ns, k, None) is not None}
    fields["warmup"] = not ns.no_warmup
    fields["allow_image_host"] = list(ns.allow_image_host or ())
    try:
        return RayServeArgs.model_validate(fields)
    except ValidationError as e:  # one line per problem, named by its flag
        raise DreamLLMError("; ".join(
            (f"--{str(err['loc'][0]).replace('_', '-')}: " if err["loc"] else "")
            + err["msg"].removeprefix("Value error, ") for err in e.errors())) from None


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_for_interrupt() -> None:
    while True:
        time.sleep(3600)


def serve_on_ray(ns) -> int:
    """`dreamllm-fast serve --ray ...`: connect to (or start) a Ray cluster, start Ray Serve's
    HTTP proxy on --host/--port, deploy the replicas, serve until Ctrl-C, then delete the app."""
    import sys

    import ray

    from ..tiny import embedded_checkpoint
    from .security import is_loopback

    ns.checkpoint = embedded_checkpoint(ns.checkpoint)
    ns.api_key = ns.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(ns.host) and not ns.api_key:
        print(f"warning: serving on {ns.host} without an API key: anyone who reaches this port "
              f"can use the model (set --api-key or {API_KEY_ENV})", file=sys.stderr)
    if ns.num_gpus is not None and ns.num_gpus == 0 and ns.device == "cuda":
        raise DreamLLMError("--device cuda with --num-gpus 0: a replica that reserves no GPU "
                            "must not use one; drop --device or reserve a GPU per replica")
    args_from_cli(ns)  # bad flags fail here, before any cluster starts
    # None: $RAY_ADDRESS, else the cluster `ray start` made on this machine, else a new local one
    ray.init(address=ns.ray_address, namespace="serve")
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if ns.num_gpus is None:  # one GPU per replica where the cluster has GPUs
        ns.num_gpus = 0.0 if ns.device == "cpu" or gpus == 0 else 1.0
    if ns.num_gpus > 0 and gpus == 0:
        raise DreamLLMError(f"--num-gpus {ns.num_gpus:g}: this Ray cluster has no GPUs; add GPU "
                            f"nodes, or serve on CPUs with --num-gpus 0")
    if ns.num_gpus == 0:
        ns.device = "cpu"
    rargs = args_from_cli(ns).resolved()
    port = ns.port or _free_port(ns.host)
    if rargs.autoscaling:
        auto = rargs.deployment_options()["autoscaling_config"]
        n = (f"{auto['initial_replicas']} replica(s), autoscaling "
             f"{auto['min_replicas']}..{auto['max_replicas']}")
    else:
        n = f"{rargs.replicas} replica(s)"
    # Serve's HTTP proxy listens here (on every node of a multi-node cluster); an already
    # running Serve instance keeps the address it was started with.
    serve.start(http_options={"host": ns.host, "port": port})
    try:
        print(f"deploying {n} of {rargs.checkpoint} ({rargs.num_gpus:g} GPU each, "
              f"{rargs.scheduler} scheduler); a replica is ready once its model is loaded and "
              f"warmed up", flush=True)
        try:
            serve.run(build_app(rargs), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # Ray gave up on the replicas (see their logs above)
            raise DreamLLMError(f"the replicas did not start: {e}") from None
        url_host = f"[{ns.host}]" if ":" in ns.host else ns.host
        print(f"serving {rargs.serve_config(None).model_name!r} on http://{url_host}:{port} "
              f"through Ray Serve ({n}); Ctrl-C stops", flush=True)
        _wait_for_interrupt()
    except KeyboardInterrupt:
        pass
    finally:
        # Only this application goes: other apps of a shared cluster keep serving. A Ray
        # instance this process started stops with it (ray.shutdown); a joined one does not.
        serve.delete(APP_NAME)
        ray.shutdown()
    return 0
