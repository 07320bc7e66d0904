"""The FastAPI app: OpenAI-compatible routes over any `Scheduler`. One factory, `create_app`, is
the only place the routes exist; `dreamllm-fast serve` runs its app under uvicorn, and a Ray Serve
deployment mounts the same app (`serve.ingress(create_app(None, cfg, manage_scheduler=False))`,
then sets ``app.state.scheduler`` in the replica).

Routes: POST /v1/chat/completions, POST /v1/completions (completions.py: the raw prompt of
`DreamLLMPipeline.complete`), POST /v1/images/generations, GET /v1/models[/{id}],
GET /health (open; 503 until the scheduler is ready), GET /metrics (Prometheus text), GET / and
/ui/* (the chat page, open: serving/webui.py). A streamed interleaved answer carries the progress
of an image being drawn as an extension field of its deltas (serving/progress.py).
Errors are OpenAI's error JSON with the matching status (400 bad input, 401 key, 404 model or
route, 413 body, 429 queue full + Retry-After, 503 not ready, 500 bug). A client that disconnects
(streamed or not) cancels its request, which frees its queue place or KV slot.
"""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Optional

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import DreamLLMError
from .completions import UNSUPPORTED_COMPLETION, CompletionRequest, completion_request
from .metrics import ServingMetrics
from .protocol import ApiError, ServeConfig, chat_request, decode_json_body, images_request, parse_body
from .request_models import (UNSUPPORTED_CHAT, UNSUPPORTED_IMAGES, ChatCompletionRequest,
                             ImageGenerationRequest)
from .responses import (completion_body, completion_choice, images_response, model_card,
                        to_api_error, usage)
from .scheduler import RequestHandle, Scheduler
from .security import BodyLimitMiddleware, BodyTooLarge, api_key_ok, error_body
from .slow_clients import UploadAborted, read_body
from .streaming import EventStream, collect, content_of, stream_chat, stream_completion
from .webui import add_webui

log = logging.getLogger("dreamllm_fast.serving")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/images/generations", "/v1/models",
          "/health", "/metrics")


def create_app(scheduler: Optional[Scheduler], config: Optional[ServeConfig] = None, *,
               manage_scheduler: bool = True) -> FastAPI:
    """The server app. manage_scheduler: start the scheduler when the app starts and shut it
    down when it stops (False when the host, e.g. a Ray Serve replica, owns its lifecycle)."""
    cfg = config or ServeConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = None
        if cfg.media.allowed_hosts:
            import httpx

            client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                       timeout=cfg.media.fetch_timeout_s)
        app.state.http_client = client
        sched = app.state.scheduler
        if manage_scheduler and sched is not None:
            sched.start()
        try:
            yield
        finally:
            if client is not None:
                await client.aclose()
            if manage_scheduler and sched is not None:
                await anyio.to_thread.run_sync(sched.shutdown)

    app = FastAPI(title="dreamllm-fast", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.config = cfg
    app.state.http_client = None
    app.state.created = int(time.time())
    metrics = app.state.metrics = ServingMetrics(
        lambda: app.state.scheduler.stats() if app.state.scheduler is not None else None)
    app.add_middleware(_StatusCounter, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes)
    _add_error_handlers(app)
    add_webui(app)  # GET / (the chat page) and /ui/* (serving/webui.py)

    def auth(request: Request) -> None:
        if not api_key_ok(request.headers.get("authorization"), cfg.api_key):
            missing = not request.headers.get("authorization")
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'" if missing
                           else "incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def ready(request: Request) -> Scheduler:
        sched = request.app.state.scheduler
        h = sched.health() if sched is not None else None
        if h is None or not h.ready:
            raise ApiError(503, f"the model is not ready ({h.detail if h else 'no scheduler'}); "
                                f"retry shortly", "service_unavailable", code="model_not_ready",
                           headers={"Retry-After": "5"})
        return sched

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != cfg.model_name:
            raise ApiError(404, f"the model {name!r} does not exist on this server; it serves "
                                f"{cfg.model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    # -- routes -------------------------------------------------------------------------------
    @app.get("/health")
    async def health(request: Request):
        sched = request.app.state.scheduler
        if sched is None:
            raise ApiError(503, "not ready: no scheduler attached", "service_unavailable",
                           code="model_not_ready", headers={"Retry-After": "5"})
        h = sched.health()
        if not h.ready:
            raise ApiError(503, f"not ready: {h.detail}", "service_unavailable",
                           code="model_failed" if h.failed else "model_not_ready",
                           headers={} if h.failed else {"Retry-After": "5"})
        return {"status": "ok", "model": cfg.model_name, "scheduler": sched.name}

    @app.get("/metrics", dependencies=[Depends(auth)])
    async def metrics_route():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [model_card(cfg.model_name, app.state.created)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(auth)])
    async def model(model_id: str):
        check_model(model_id)
        return model_card(cfg.model_name, app.state.created)

    async def accept(request: Request, model: type, unsupported: dict, build):
        """A chat or completion request parsed, checked, turned into a `GenerationRequest` by
        `build` (protocol.chat_request, completions.completion_request) and queued: (body, handle)."""
        body = parse_body(await _json(request), model, unsupported)
        check_model(body.model)
        sched = ready(request)
        gen = await build(body, cfg, request.app.state.http_client,
                          context=(sched.max_context, sched.image_tokens))
        return body, await _submit(sched, gen)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(request: Request):
        t0 = time.monotonic()
        body, handle = await accept(request, ChatCompletionRequest, UNSUPPORTED_CHAT, chat_request)
        headers = {"x-request-id": handle.request_id}
        if body.stream:
            return EventStream(stream_chat(handle, body, cfg, metrics, t0), headers=headers)
        results = await collect(request, handle, metrics, "/v1/chat/completions", t0)
        if results is None:
            return Response(status_code=499)  # the client left; nobody reads this
        interleaved = handle.request.kind == "interleaved"
        choices, completion = [], 0
        for i, r in sorted(results.items()):
            content = await anyio.to_thread.run_sync(content_of, r["parts"], interleaved)
            choices.append({"index": i, "message": {"role": "assistant", "content": content},
                            "logprobs": None, "finish_reason": r["finish"]})
            completion += r["tokens"]
        out = completion_body("chat.completion", handle.request_id, cfg.model_name, choices,
                              usage(handle.prompt_tokens, completion))
        return JSONResponse(out, headers=headers)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request):
        t0 = time.monotonic()
        body, handle = await accept(request, CompletionRequest, UNSUPPORTED_COMPLETION,
                                    completion_request)
        headers = {"x-request-id": handle.request_id}
        if body.stream:
            return EventStream(stream_completion(handle, body, cfg, metrics, t0), headers=headers)
        results = await collect(request, handle, metrics, "/v1/completions", t0)
        if results is None:
            return Response(status_code=499)
        choices = [completion_choice(i, "".join(r["parts"]), r["finish"])
                   for i, r in sorted(results.items())]
        used = usage(handle.prompt_tokens, sum(r["tokens"] for r in results.values()))
        return JSONResponse(completion_body("text_completion", handle.request_id, cfg.model_name,
                                            choices, used), headers=headers)

    @app.post("/v1/images/generations", dependencies=[Depends(auth)])
    async def images_generations(request: Request):
        t0 = time.monotonic()
        body = parse_body(await _json(request), ImageGenerationRequest, UNSUPPORTED_IMAGES)
        check_model(body.model)
        sched = ready(request)
        handle = await _submit(sched, images_request(body, cfg))
        results = await collect(request, handle, metrics, "/v1/images/generations", t0)
        if results is None:
            return Response(status_code=499)
        images = [p for _, r in sorted(results.items()) for p in r["parts"] if not isinstance(p, str)]
        out = await anyio.to_thread.run_sync(images_response, images)
        return JSONResponse(out, headers={"x-request-id": handle.request_id})

    return app


# -- helpers ---------------------------------------------------------------------------------------
async def _json(request: Request):
    raw = await read_body(request, request.app.state.config.body_timeout_s)
    return decode_json_body(raw, request.headers.get("content-type"))


async def _submit(sched: Scheduler, gen) -> RequestHandle:
    try:
        return await sched.submit(gen)
    except DreamLLMError as e:
        raise to_api_error(e) from None


class _StatusCounter:
    """Counts responses by route and status for /metrics (pure ASGI: streaming stays intact)."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")

        async def counting_send(msg):
            if msg["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(msg["status"])).inc()
            await send(msg)

        await self.app(scope, receive, counting_send)


def _add_error_handlers(app: FastAPI) -> None:
    def render(e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status,
                            headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api(request, e: ApiError):
        return render(e)

    @app.exception_handler(UploadAborted)
    async def _aborted(request, e: UploadAborted):
        client = request.client
        log.info("%s %s: the client (%s) disconnected before its request body was complete",
                 request.method, request.url.path,
                 f"{client.host}:{client.port}" if client else "?")
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, e: BodyTooLarge):
        return render(ApiError(413, str(e), code="request_too_large"))

    @app.exception_handler(DreamLLMError)
    async def _dream(request, e: DreamLLMError):
        return render(to_api_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) \
            else str(e.detail)
        return render(ApiError(e.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}
                               .get(e.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        return render(ApiError(400, str(e.errors()[0].get("msg", e))))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return render(to_api_error(e))


def lower_pillow_guard(max_pixels: int) -> None:
    """Pillow's own bomb check (the last guard) never above ours. It is process-wide, so only
    the process that is the server sets it (`dreamllm-fast serve`); an app mounted in someone
    else's process leaves it at Pillow's default (~89 Mpx warning, ~179 Mpx error)."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
