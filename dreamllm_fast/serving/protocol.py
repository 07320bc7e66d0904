"""OpenAI wire format: a request body, decoded and validated (`parse_body`) against its model
(request_models.py), into a `GenerationRequest` (`chat_request`, `images_request`; the
completion route's is in completions.py). The response bodies are in responses.py.

Mapping to the model:
- ``temperature`` 0 is greedy decoding; > 0 samples (OpenAI's default is 1; its range, [0, 2]).
  ``top_p`` and the extension ``top_k`` filter the distribution (``top_k`` 0 or vLLM's -1: off).
- Every number is bounded at parse time (request_models.py) to what the engine takes, so no
  admitted request can fail a shared step with an overflow; settings that depend on the model (the diffusion steps, image sizes, the context)
  are checked by the scheduler's `submit` before queueing.
- System messages: the "vicuna_v1.1" template the model was tuned on has one system prompt, at the
  start. Leading system (or ``developer``) messages are joined with newlines and replace the
  default system prompt; a system message after the conversation started is refused (400).
- ``seed`` s: choice i samples with ``torch.Generator(device).manual_seed(s + i)`` (the model's
  device); without a seed each request draws a fresh one.
- ``"modalities": ["text", "image"]`` asks for an interleaved answer; its content is a list of
  ``text`` and ``image_url`` (PNG data URL) parts, in order. Extensions for its images:
  ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``, ``max_images``, ``sampler``
  ("ddpm", the default and the original's, "dpmpp-2m" or "unipc"; also on image requests).
"""
from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ValidationError

from ..errors import InvalidInputError
from ..sampling import SamplingParams
from .media import MediaLimits, decode_image, image_bytes, parse_size
from .request_models import (ChatCompletionRequest, GenerationFields, ImageGenerationRequest, ImagePart,
                             Message, TextPart)
from .scheduler import GenerationRequest, ImageOptions


@dataclass
class ServeConfig:
    """HTTP-side settings (the scheduler has its own: queue size, batch)."""

    model_name: str = "dreamllm"
    api_key: Optional[str] = None
    max_body_bytes: int = 32 * 2**20
    body_timeout_s: Optional[float] = 30.0  # a request body must arrive within it (None: no limit)
    media: MediaLimits = field(default_factory=MediaLimits)
    max_n: int = 8
    max_stop: int = 4  # OpenAI's limit on stop strings
    # OpenAI's range is [0, 2] (--max-temperature opens it: the tiny test model's logits are so
    # peaked that T <= 2 samples its greedy text, so the sampling tests use T = 8)
    max_temperature: float = 2.0
    # Defaults of the images of interleaved answers and /v1/images/generations (the original's
    # text-to-image function: 50 DDPM steps, guidance 7.5).
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    max_images: int = 4


class ApiError(Exception):
    """An error with its HTTP status, rendered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


_JSON_TYPES = ("application/json",)


def decode_json_body(raw: bytes, content_type: Optional[str]) -> Any:
    """The request body -> a Python object, or ApiError(400).

    Content-Type must be JSON (application/json or a ``+json`` type) when it is sent; a body
    without one is read as JSON (``curl -d`` sends a form type, which is refused with the fix in
    the message). Strings must be valid Unicode: JSON lets ``"\\ud800"`` name a lone UTF-16
    surrogate, which no tokenizer takes, so it is refused here with its place."""
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    if ctype and ctype not in _JSON_TYPES and not ctype.endswith("+json"):
        raise ApiError(400, f"Content-Type {ctype!r} is not supported: send the body as JSON with "
                            f"'Content-Type: application/json'")
    if not raw:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    where = _bad_unicode(obj, "")
    if where is not None:  # the path itself may hold the surrogate (a key): escape it
        where = where.encode("utf-8", "backslashreplace").decode("utf-8")
        raise ApiError(400, f"{where or 'the body'}: the string holds a lone UTF-16 surrogate "
                            f"(e.g. \\ud800 without its pair); send valid Unicode",
                       param=where or None)
    return obj


def _bad_unicode(obj: Any, path: str) -> Optional[str]:
    """The dotted path of the first string (or key) that is not encodable as UTF-8, else None."""
    stack = [(obj, path)]
    while stack:
        o, p = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                return p
        elif isinstance(o, dict):
            for k, v in o.items():
                q = f"{p}.{k}" if p else str(k)
                stack.append((k, q))
                stack.append((v, q))
        elif isinstance(o, list):
            stack.extend((v, f"{p}.{i}" if p else str(i)) for i, v in enumerate(o))
    return None


def parse_body(raw: Any, model: type, unsupported: dict) -> Any:
    """The JSON body (already a Python object) -> a validated model, or ApiError(400)."""
    if not isinstance(raw, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, (neutral, why) in unsupported.items():
        if name in raw:
            v = raw.pop(name)
            if not any(v == n and type(v) is type(n) for n in neutral) and why:
                raise ApiError(400, why, param=name, code="unsupported_parameter")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        # pydantic reports every field's fault; the first in the model's wire order is the one
        # told (unknown fields and whole-body faults after the known fields, as pydantic lists them)
        order = {name: i for i, name in enumerate(getattr(model, "FIELD_ORDER", ()))}
        err = min(e.errors(), key=lambda x: order.get(x["loc"][0] if x["loc"] else None, len(order)))
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {loc}", param=loc,
                           code="unknown_parameter") from None
        raise ApiError(400, f"{loc}: {err['msg']}", param=loc or None) from None


# -- into the engine's terms -----------------------------------------------------------------------
def check_choices(body, cfg: ServeConfig) -> int:
    """`n` (1 if unset) of a chat, completion or image request, at most the server's --max-n."""
    n = body.n or 1
    if n > cfg.max_n:
        raise ApiError(400, f"n must be at most {cfg.max_n} on this server (--max-n), got {n}", param="n")
    return n


def check_stream_options(body: GenerationFields) -> None:
    """OpenAI refuses stream_options on a request that is not streamed; so does this server."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")


def check_stops(stop, cfg: ServeConfig) -> list[str]:
    """`stop` (a string or a list) as a list, bounded by the server's limits."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > cfg.max_stop or any(not s for s in stops):
        raise ApiError(400, f"stop takes at most {cfg.max_stop} non-empty strings", param="stop")
    return stops


def check_sampling(body: GenerationFields, cfg: ServeConfig) -> SamplingParams:
    """The sampling settings of a chat or completion request (max_new_tokens set later): OpenAI's
    temperature range up to the server's `--max-temperature`, 0 meaning greedy."""
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature > cfg.max_temperature:
        raise ApiError(400, f"temperature must be in [0, {cfg.max_temperature:g}], got "
                            f"{temperature:g}", param="temperature")
    try:
        return SamplingParams(
            max_new_tokens=1, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p)
    except InvalidInputError as e:
        raise ApiError(400, str(e)) from None


async def chat_request(body: ChatCompletionRequest, cfg: ServeConfig, client=None,
                       context: Optional[tuple[int, int]] = None) -> GenerationRequest:
    """Validate semantics and resolve images (data URLs, allow-listed fetches) into PIL images.

    context: (the model's context in tokens, tokens per input image) when known (the scheduler
    is ready): the image count is checked against it before any image is decoded."""
    n = check_choices(body, cfg)
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one of them",
                       param="max_completion_tokens")
    check_stream_options(body)
    modalities = set(body.modalities or ["text"])
    if modalities == {"image"}:
        raise ApiError(400, "modalities ['image'] alone is not a chat answer: use "
                            "/v1/images/generations, or ['text', 'image'] for an interleaved answer",
                       param="modalities")
    interleaved = "image" in modalities
    stops = check_stops(body.stop, cfg)
    messages = await _messages(body.messages, cfg, client, context)
    sampling = check_sampling(body, cfg)
    if not interleaved:
        for name in ("num_inference_steps", "guidance_scale", "negative_prompt", "max_images",
                     "sampler"):
            if getattr(body, name) is not None:
                raise ApiError(400, f"{name} applies to interleaved answers only: add "
                                    f"\"modalities\": [\"text\", \"image\"]", param=name)
    return GenerationRequest(
        kind="interleaved" if interleaved else "chat", seeds=_seeds(body.seed, n),
        messages=messages, max_new_tokens=body.max_completion_tokens or body.max_tokens,
        sampling=sampling, stop=tuple(stops), image=_image_options(body, cfg),
        request_id=f"chatcmpl-{uuid.uuid4().hex}")


def images_request(body: ImageGenerationRequest, cfg: ServeConfig) -> GenerationRequest:
    n = check_choices(body, cfg)
    if body.response_format == "url":
        raise ApiError(400, "response_format 'url' is not supported: this server keeps no image "
                            "store to link to; use 'b64_json'", param="response_format")
    try:
        size = parse_size(body.size)
    except ValueError as e:
        raise ApiError(400, str(e), param="size") from None
    opts = _image_options(body, cfg)
    opts.size = size
    return GenerationRequest(kind="image", seeds=_seeds(body.seed, n), prompt=body.prompt,
                             image=opts, request_id=f"img-{uuid.uuid4().hex}")


def _image_options(body, cfg: ServeConfig) -> ImageOptions:
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return ImageOptions(num_inference_steps=pick(body.num_inference_steps, cfg.num_inference_steps),
                        guidance_scale=pick(body.guidance_scale, cfg.guidance_scale),
                        negative_prompt=body.negative_prompt,
                        max_images=pick(getattr(body, "max_images", None), cfg.max_images),
                        sampler=pick(body.sampler, "ddpm"))


def _seeds(seed: Optional[int], n: int) -> list[int]:
    base = secrets.randbelow(2**62) if seed is None else seed
    if not -2**63 <= base < 2**63:
        raise ApiError(400, "seed must be a 64-bit signed integer", param="seed")
    return [(base + i) % 2**64 for i in range(n)]  # Generator.manual_seed takes any 64-bit value


def max_input_images(limits: MediaLimits, context: Optional[tuple[int, int]]) -> int:
    """Images a request may carry: --max-input-images, else as many as fit the context beside
    the BOS token ((context - 1) // tokens per image: 7 at 2048 tokens and 258 per image), else
    (context unknown) 8."""
    if limits.max_images is not None:
        return limits.max_images
    if context and context[0] > 0 and context[1] > 0:
        return (context[0] - 1) // context[1]
    return 8


def check_image_count(n: int, limits: MediaLimits, context: Optional[tuple[int, int]],
                      param: str = "messages") -> None:
    """Refuse, before any image is decoded, more images than allowed or than fit the context."""
    if context and context[0] > 0 and context[1] > 0 and 1 + n * context[1] > context[0]:
        raise ApiError(400, f"This model's maximum context length is {context[0]} tokens. "
                            f"However, the {n} images take {n * context[1]} tokens ({context[1]} "
                            f"each) before any text. Pass fewer images.", param=param,
                       code="context_length_exceeded")
    limit = max_input_images(limits, context)
    if n > limit:
        raise ApiError(400, f"at most {limit} images per request (--max-input-images), got {n}",
                       param=param)


async def _messages(msgs: list[Message], cfg: ServeConfig, client,
                    context: Optional[tuple[int, int]] = None) -> list[dict]:
    """OpenAI messages -> pipeline messages: {"role", "content": [str | PIL.Image, ...]}.

    Images in three passes, so a request's memory is bounded before anything is decoded: count
    (against --max-input-images and the context), read and check every header, then decode."""
    import anyio

    n_images = sum(1 for m in msgs if isinstance(m.content, list)
                   for p in m.content if isinstance(p, ImagePart))
    check_image_count(n_images, cfg.media, context)
    system: list[str] = []
    out: list[dict] = []
    encoded: list[tuple] = []  # (content list, position, bytes, i, j): decoded after the loop
    for i, m in enumerate(msgs):
        if m.role in ("system", "developer"):
            if out:
                raise ApiError(400, f"messages[{i}]: a {m.role} message after the conversation "
                                    f"started; the model's chat template has one system prompt, "
                                    f"at the start: move it there", param=f"messages.{i}.role")
            parts = m.content if isinstance(m.content, list) else \
                [TextPart(type="text", text=m.content or "")]
            if any(isinstance(p, ImagePart) for p in parts):
                raise ApiError(400, f"messages[{i}]: a {m.role} message cannot contain images",
                               param=f"messages.{i}.content")
            system.append("".join(p.text for p in parts))
            continue
        if m.content is None:
            raise ApiError(400, f"messages[{i}].content is missing (tool calls are not supported)",
                           param=f"messages.{i}.content")
        content: list = []
        for j, p in enumerate(m.content if isinstance(m.content, list) else [m.content]):
            if isinstance(p, str):
                content.append(p)
            elif isinstance(p, TextPart):
                content.append(p.text)
            else:
                try:
                    data = await image_bytes(p.image_url.url, cfg.media, client)
                except InvalidInputError as e:
                    raise _image_error(i, j, e) from None
                encoded.append((content, len(content), data, i, j))
                content.append(None)  # decoded below, once every header passed
        out.append({"role": m.role, "content": content})
    for content, k, data, i, j in encoded:
        try:
            content[k] = await anyio.to_thread.run_sync(decode_image, data, cfg.media)
        except InvalidInputError as e:
            raise _image_error(i, j, e) from None
    if not out:
        raise ApiError(400, "messages holds only system messages; add a user message (the model "
                            "answers the last user message)", param="messages")
    if system:
        out.insert(0, {"role": "system", "content": "\n".join(system)})
    return out


def _image_error(i: int, j: int, e: Exception) -> ApiError:
    return ApiError(400, f"messages[{i}].content[{j}]: {e}",
                    param=f"messages.{i}.content.{j}.image_url", code="invalid_image")
