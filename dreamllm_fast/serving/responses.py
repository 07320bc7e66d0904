"""OpenAI response bodies (chat and text completions, their chunks, images, models) and the mapping of this
package's errors to OpenAI error responses (`to_api_error`)."""
from __future__ import annotations

import time
from typing import Literal, Optional

from ..errors import ContextOverflowError, EngineBusyError, ImageLoadError, InvalidInputError
from .media import png_b64, png_data_url
from .protocol import ApiError
from .scheduler import NotReadyError, QueueFullError

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part(image) -> dict:
    return {"type": "image_url", "image_url": {"url": png_data_url(image)}}


def completion_body(object_: str, request_id: str, model: str, choices: list[dict],
                    usage_: dict) -> dict:
    """A whole answer; object_: "chat.completion" (/v1/chat/completions) or "text_completion"
    (/v1/completions)."""
    return {"id": request_id, "object": object_, "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_,
            "system_fingerprint": system_fingerprint()}


def chunk_body(object_: str, request_id: str, model: str, created: int, choices: list[dict],
               usage_: Optional[dict] = None, with_usage: bool = False) -> dict:
    """One server-sent event of a streamed answer; object_: "chat.completion.chunk" or
    "text_completion" (OpenAI's completion chunks are that object too). with_usage
    (stream_options.include_usage): every chunk has a ``usage`` key, null but on the last one."""
    d = {"id": request_id, "object": object_, "created": created, "model": model,
         "choices": choices, "system_fingerprint": system_fingerprint()}
    if with_usage:
        d["usage"] = usage_
    return d


def completion_choice(index: int, text: str,
                      finish_reason: Optional[Literal["stop", "length", "cancelled"]]) -> dict:
    """A choice of /v1/completions, whole or streamed."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def images_response(images: list) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": png_b64(im)} for im in images],
            "output_format": "png"}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "dreamllm-fast"}


def system_fingerprint() -> str:
    from .. import __version__

    return f"dreamllm-fast-{__version__}"


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
