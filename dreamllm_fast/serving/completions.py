"""POST /v1/completions: the server face of `DreamLLMPipeline.complete()` (OpenAI's legacy
completions API, which vLLM, SGLang and llama.cpp all serve).

The prompt is raw: no chat template, ``<s>`` + the prompt, the in-context few-shot use of the
model ("<image> This is a Welsh Corgi. <image> This is a Koala. <image> This is"). A completion
is text: it ends at ``</s>``, at ``<dream_start>`` (as ``complete(..., max_images=0)``: drawing is
the chat route's interleaved answers' job), at a stop string or after ``max_tokens`` (OpenAI's
default: 16).

Extension for images in a raw prompt: ``images``, a list of data URLs (or allow-listed http(s)
URLs), one for each ``<image>`` placeholder in the prompt, in order. The image checks and
limits are the chat route's (protocol.py: count against the context first, then every header,
then decoding).
"""
from __future__ import annotations

import uuid
from typing import Optional, Union

from .media import decode_image, image_bytes
from .protocol import (ApiError, ServeConfig, _seeds, check_choices, check_image_count,
                       check_sampling, check_stops, check_stream_options)
from .request_models import _NO, UNSUPPORTED_SAMPLING, GenerationFields
from .scheduler import GenerationRequest

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for completions


class CompletionRequest(GenerationFields):
    FIELD_ORDER = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                   "n", "stream", "stream_options", "user", "images")

    prompt: Union[str, list[str]]
    images: Optional[list[str]] = None  # extension: one URL per <image> in the prompt


UNSUPPORTED_COMPLETION: dict[str, tuple[tuple, str]] = {
    "echo": ((None, False), f"echo {_NO}"),
    "logprobs": ((None, 0), f"logprobs {_NO}"),
    "suffix": ((None, ""), f"suffix (insertion) {_NO}"),
    "best_of": ((None, 1), f"best_of {_NO}; use n"),
    **UNSUPPORTED_SAMPLING,
}


async def completion_request(body: CompletionRequest, cfg: ServeConfig, client=None,
                             context: Optional[tuple[int, int]] = None) -> GenerationRequest:
    """Validate and resolve the prompt's images into the raw content `complete()` takes."""
    import anyio

    from ..errors import InvalidInputError

    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: send one prompt per request (got a list of "
                                f"{len(prompt)}); batch by sending requests concurrently",
                           param="prompt")
        prompt = prompt[0]
    n = check_choices(body, cfg)
    check_stream_options(body)
    stops = check_stops(body.stop, cfg)
    sampling = check_sampling(body, cfg)
    texts = prompt.split(IMAGE_PLACEHOLDER)
    urls = body.images or []
    if len(texts) - 1 != len(urls):
        raise ApiError(400, f"the prompt has {len(texts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) "
                            f"and images has {len(urls)} URL(s); send one image per placeholder",
                       param="images")
    check_image_count(len(urls), cfg.media, context, param="images")
    data = []
    for j, url in enumerate(urls):  # every header before any decode
        try:
            data.append(await image_bytes(url, cfg.media, client))
        except InvalidInputError as e:
            raise ApiError(400, f"images[{j}]: {e}", param=f"images.{j}", code="invalid_image") from None
    content: list = [texts[0]] if texts[0] else []
    for j, (d, text) in enumerate(zip(data, texts[1:])):
        try:
            content.append(await anyio.to_thread.run_sync(decode_image, d, cfg.media))
        except InvalidInputError as e:
            raise ApiError(400, f"images[{j}]: {e}", param=f"images.{j}", code="invalid_image") from None
        if text:
            content.append(text)
    max_new = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    return GenerationRequest(kind="completion", seeds=_seeds(body.seed, n), content=content,
                             max_new_tokens=max_new, sampling=sampling, stop=tuple(stops),
                             request_id=f"cmpl-{uuid.uuid4().hex}")

