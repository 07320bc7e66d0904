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

from .completions import completion_choice, completion_chunk
from .metrics import ServingMetrics
from .progress import ImageProgress
from .protocol import ChatCompletionRequest, ServeConfig
from .responses import chat_chunk, image_part, text_part, to_api_error, usage
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


async def stream_chat(handle: RequestHandle, body: ChatCompletionRequest, cfg: ServeConfig,
                       metrics: ServingMetrics, t0: float):
    route = "/v1/chat/completions"
    rid, model, created = handle.request_id, cfg.model_name, int(time.time())
    with_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices, u=None):
        return sse(chat_chunk(rid, model, created, choices, u, with_usage))
    completion, first = 0, True
    try:
        for i in range(handle.request.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        async for ev in handle:
            if isinstance(ev, RequestFailed):
                err = to_api_error(ev.error)
                yield sse(error_body(err.message, err.type, err.code, err.param))
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


async def stream_completion(handle: RequestHandle, body, cfg: ServeConfig,
                             metrics: ServingMetrics, t0: float):
    """/v1/completions chunks: text per choice, the last piece with its finish_reason."""
    route = "/v1/completions"
    rid, model, created = handle.request_id, cfg.model_name, int(time.time())
    with_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices, u=None):
        return sse(completion_chunk(rid, model, created, choices, u, with_usage))
    done_tokens, first = 0, True
    try:
        async for ev in handle:
            if isinstance(ev, RequestFailed):
                err = to_api_error(ev.error)
                yield sse(error_body(err.message, err.type, err.code, err.param))
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
