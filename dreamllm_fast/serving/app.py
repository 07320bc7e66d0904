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

import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Optional

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import (ContextOverflowError, DreamLLMError, EngineBusyError, ImageLoadError,
                      InvalidInputError)
from .completions import (UNSUPPORTED_COMPLETION, CompletionRequest, completion, completion_choice,
                          completion_chunk, completion_request)
from .metrics import ServingMetrics
from .progress import ImageProgress
from .protocol import (UNSUPPORTED_CHAT, UNSUPPORTED_IMAGES, ApiError, ChatCompletionRequest,
                       ImageGenerationRequest, ServeConfig, chat_chunk, chat_completion,
                       chat_request, decode_json_body, image_part, images_request, images_response, model_card,
                       parse_body, text_part, usage)
from .scheduler import (ChoiceDone, ImageResult, NotReadyError, QueueFullError, RequestFailed,
                        RequestHandle, Scheduler, TextDelta)
from .security import BodyLimitMiddleware, BodyTooLarge, api_key_ok, error_body
from .slow_clients import UploadAborted, read_body
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

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(request: Request):
        t0 = time.monotonic()
        body = parse_body(await _json(request), ChatCompletionRequest, UNSUPPORTED_CHAT)
        check_model(body.model)
        sched = ready(request)
        gen = await chat_request(body, cfg, request.app.state.http_client,
                                 context=(sched.max_context, sched.image_tokens))
        handle = await _submit(sched, gen)
        headers = {"x-request-id": handle.request_id}
        if body.stream:
            return _EventStream(_stream_chat(handle, body, cfg, metrics, t0), headers=headers)
        results = await _collect(request, handle, metrics, "/v1/chat/completions", t0)
        if results is None:
            return Response(status_code=499)  # the client left; nobody reads this
        interleaved = handle.request.kind == "interleaved"
        choices, completion = [], 0
        for i, r in sorted(results.items()):
            content = await anyio.to_thread.run_sync(_content, r["parts"], interleaved)
            choices.append({"index": i, "message": {"role": "assistant", "content": content},
                            "logprobs": None, "finish_reason": r["finish"]})
            completion += r["tokens"]
        out = chat_completion(handle.request_id, cfg.model_name, choices,
                              usage(handle.prompt_tokens, completion))
        return JSONResponse(out, headers=headers)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request):
        t0 = time.monotonic()
        body = parse_body(await _json(request), CompletionRequest, UNSUPPORTED_COMPLETION)
        check_model(body.model)
        sched = ready(request)
        gen = await completion_request(body, cfg, request.app.state.http_client,
                                       context=(sched.max_context, sched.image_tokens))
        handle = await _submit(sched, gen)
        headers = {"x-request-id": handle.request_id}
        if body.stream:
            return _EventStream(_stream_completion(handle, body, cfg, metrics, t0), headers=headers)
        results = await _collect(request, handle, metrics, "/v1/completions", t0)
        if results is None:
            return Response(status_code=499)
        choices = [completion_choice(i, "".join(r["parts"]), r["finish"])
                   for i, r in sorted(results.items())]
        used = usage(handle.prompt_tokens, sum(r["tokens"] for r in results.values()))
        return JSONResponse(completion(handle.request_id, cfg.model_name, choices, used),
                            headers=headers)

    @app.post("/v1/images/generations", dependencies=[Depends(auth)])
    async def images_generations(request: Request):
        t0 = time.monotonic()
        body = parse_body(await _json(request), ImageGenerationRequest, UNSUPPORTED_IMAGES)
        check_model(body.model)
        sched = ready(request)
        handle = await _submit(sched, images_request(body, cfg))
        results = await _collect(request, handle, metrics, "/v1/images/generations", t0)
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


def to_api_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), "rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, (NotReadyError, EngineBusyError)):
        return ApiError(503, str(e), "service_unavailable", code="model_not_ready",
                        headers={"Retry-After": "5"})
    if isinstance(e, ContextOverflowError):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, ImageLoadError):
        return ApiError(400, str(e), code="invalid_image")
    if isinstance(e, InvalidInputError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal server error ({type(e).__name__}); see the server log",
                    "server_error")


def _content(parts: list, interleaved: bool):
    if not interleaved:
        return "".join(parts)
    out: list[dict] = []
    for p in parts:
        if isinstance(p, str):
            if out and out[-1]["type"] == "text":
                out[-1]["text"] += p
            else:
                out.append(text_part(p))
        else:
            out.append(image_part(p))
    return out


async def _collect(request: Request, handle: RequestHandle, metrics: ServingMetrics, route: str,
                   t0: float) -> Optional[dict]:
    """All events of a non-streamed request, per choice; None if the client disconnected (the
    request is then cancelled). Raises the request's failure as an ApiError."""
    results = {i: {"parts": [], "finish": None, "tokens": 0} for i in range(handle.request.n)}
    failure: Optional[BaseException] = None
    gone = False
    first = True

    async def watch(scope):
        nonlocal gone
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                gone = True
                handle.cancel()
                scope.cancel()
                return

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            async for ev in handle:
                if isinstance(ev, (TextDelta, ImageResult)):
                    if first:
                        metrics.ttft.labels(route).observe(time.monotonic() - t0)
                        first = False
                    results[ev.index]["parts"].append(ev.text if isinstance(ev, TextDelta) else ev.image)
                elif isinstance(ev, ChoiceDone):
                    if ev.text:
                        results[ev.index]["parts"].append(ev.text)
                    results[ev.index]["finish"] = ev.finish_reason
                    results[ev.index]["tokens"] = ev.completion_tokens
                elif isinstance(ev, RequestFailed):
                    failure = ev.error
            tg.cancel_scope.cancel()
    finally:
        handle.cancel()  # no-op once finished; frees the request if this task was cancelled
    if gone:
        return None
    metrics.latency.labels(route).observe(time.monotonic() - t0)
    if failure is not None:
        raise to_api_error(failure)
    return results


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"


async def _stream_chat(handle: RequestHandle, body: ChatCompletionRequest, cfg: ServeConfig,
                       metrics: ServingMetrics, t0: float):
    route = "/v1/chat/completions"
    rid, model, created = handle.request_id, cfg.model_name, int(time.time())
    with_usage = bool(body.stream_options and body.stream_options.include_usage)
    def chunk(choices, u=None):
        return _sse(chat_chunk(rid, model, created, choices, u, with_usage))
    completion, first = 0, True
    try:
        for i in range(handle.request.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        async for ev in handle:
            if isinstance(ev, RequestFailed):
                err = to_api_error(ev.error)
                yield _sse(error_body(err.message, err.type, err.code, err.param))
                break
            if isinstance(ev, ChoiceDone):
                completion += ev.completion_tokens
                yield chunk([{"index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                              "logprobs": None, "finish_reason": ev.finish_reason}])
                continue
            if isinstance(ev, ImageProgress):  # an image being drawn: extension field, no content
                delta = ev.delta() if ev.preview is None else await anyio.to_thread.run_sync(ev.delta)
                yield chunk([{"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": None}])
                continue
            if first:
                metrics.ttft.labels(route).observe(time.monotonic() - t0)
                first = False
            if isinstance(ev, TextDelta):
                delta = {"content": ev.text}
            else:  # an image arrives whole, as one content part
                delta = {"content": [await anyio.to_thread.run_sync(image_part, ev.image)]}
            yield chunk([{"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": None}])
        else:
            if with_usage:
                yield chunk([], usage(handle.prompt_tokens, completion))
        yield "data: [DONE]\n\n"
        metrics.latency.labels(route).observe(time.monotonic() - t0)
    finally:
        handle.cancel()  # no-op once finished; the client left otherwise: free its slot


async def _stream_completion(handle: RequestHandle, body, cfg: ServeConfig,
                             metrics: ServingMetrics, t0: float):
    """/v1/completions chunks: text per choice, the last piece with its finish_reason."""
    route = "/v1/completions"
    rid, model, created = handle.request_id, cfg.model_name, int(time.time())
    with_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices, u=None):
        return _sse(completion_chunk(rid, model, created, choices, u, with_usage))
    done_tokens, first = 0, True
    try:
        async for ev in handle:
            if isinstance(ev, RequestFailed):
                err = to_api_error(ev.error)
                yield _sse(error_body(err.message, err.type, err.code, err.param))
                break
            if first:
                metrics.ttft.labels(route).observe(time.monotonic() - t0)
                first = False
            if isinstance(ev, ChoiceDone):
                done_tokens += ev.completion_tokens
                yield chunk([completion_choice(ev.index, ev.text, ev.finish_reason)])
            elif isinstance(ev, TextDelta):
                yield chunk([completion_choice(ev.index, ev.text, None)])
        else:
            if with_usage:
                yield chunk([], usage(handle.prompt_tokens, done_tokens))
        yield "data: [DONE]\n\n"
        metrics.latency.labels(route).observe(time.monotonic() - t0)
    finally:
        handle.cancel()  # no-op once finished; the client left otherwise: free its slot


class _EventStream(StreamingResponse):
    """SSE that always watches for the client leaving (whatever ASGI spec version the server
    reports) and closes the event generator at once, so the request is cancelled promptly."""

    media_type = "text/event-stream"

    def __init__(self, content, headers=None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                           **(headers or {})})

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


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
