"""How a request's events reach the client (serving/app.py's routes call these): all at once
(`collect`), or as server-sent events (`stream_chat`, `stream_completion`, through `EventStream`,
which cancels the request when the client goes away)."""
from __future__ import annotations

import json
import time
from typing import Optional

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from .metrics import ServingMetrics
from .progress import ImageProgress
from .protocol import ServeConfig
from .request_models import ChatCompletionRequest
from .responses import (chunk_body, completion_choice, image_part, text_part, to_api_error,
                        usage)
from .scheduler import ChoiceDone, ImageResult, RequestFailed, RequestHandle, TextDelta
from .security import error_body

def content_of(parts: list, interleaved: bool):
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


async def collect(request: Request, handle: RequestHandle, metrics: ServingMetrics, route: str,
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


def sse(obj) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"


def stream_chat(handle: RequestHandle, body: ChatCompletionRequest, cfg: ServeConfig,
                metrics: ServingMetrics, t0: float):
    """/v1/chat/completions chunks: the role first, one chunk per choice; then text deltas, an
    image whole (as one content part), the progress of an image being drawn (an extension field
    of the delta, serving/progress.py) and each choice's finish_reason with its last text."""
    async def choice(ev) -> dict:
        finish = None
        if isinstance(ev, ChoiceDone):
            delta, finish = ({"content": ev.text} if ev.text else {}), ev.finish_reason
        elif isinstance(ev, ImageProgress):
            delta = ev.delta() if ev.preview is None else await anyio.to_thread.run_sync(ev.delta)
        elif isinstance(ev, TextDelta):
            delta = {"content": ev.text}
        else:  # an image arrives whole, as one content part
            delta = {"content": [await anyio.to_thread.run_sync(image_part, ev.image)]}
        return {"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": finish}

    opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None} for i in range(handle.request.n)]
    return _stream(handle, "chat.completion.chunk", "/v1/chat/completions", body, cfg, metrics, t0,
                   opening, choice, is_output=lambda ev: not isinstance(ev, (ChoiceDone, ImageProgress)))


def stream_completion(handle: RequestHandle, body, cfg: ServeConfig, metrics: ServingMetrics,
                      t0: float):
    """/v1/completions chunks: text per choice, the last piece with its finish_reason."""
    async def choice(ev) -> Optional[dict]:
        if isinstance(ev, ChoiceDone):
            return completion_choice(ev.index, ev.text, ev.finish_reason)
        if isinstance(ev, TextDelta):
            return completion_choice(ev.index, ev.text, None)
        return None  # a completion draws no images

    return _stream(handle, "text_completion", "/v1/completions", body, cfg, metrics, t0, [],
                   choice, is_output=lambda ev: True)


async def _stream(handle: RequestHandle, object_: str, route: str, body, cfg: ServeConfig,
                  metrics: ServingMetrics, t0: float, opening: list[dict], choice, is_output):
    """The server-sent events of either route: a chunk per opening choice, then a chunk per
    event (`choice`: the route's choice dict of an event, or None), a failure as OpenAI's error
    JSON, the usage (stream_options.include_usage) and ``[DONE]``. The first event that
    `is_output` accepts marks the time to first token. The request is cancelled when the client
    goes."""
    rid, model, created = handle.request_id, cfg.model_name, int(time.time())
    with_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices, u=None):
        return sse(chunk_body(object_, rid, model, created, choices, u, with_usage))
    completion, first = 0, True
    try:
        for c in opening:
            yield chunk([c])
        async for ev in handle:
            if isinstance(ev, RequestFailed):
                err = to_api_error(ev.error)
                yield sse(error_body(err.message, err.type, err.code, err.param))
                break
            if isinstance(ev, ChoiceDone):
                completion += ev.completion_tokens
            if first and is_output(ev):
                metrics.ttft.labels(route).observe(time.monotonic() - t0)
                first = False
            c = await choice(ev)
            if c is not None:
                yield chunk([c])
        else:
            if with_usage:
                yield chunk([], usage(handle.prompt_tokens, completion))
        yield "data: [DONE]\n\n"
        metrics.latency.labels(route).observe(time.monotonic() - t0)
    finally:
        handle.cancel()  # no-op once finished; the client left otherwise: free its slot


class EventStream(StreamingResponse):
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
