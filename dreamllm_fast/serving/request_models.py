"""The request bodies the server accepts (pydantic models) and the OpenAI parameters it refuses.

Requests are validated strictly (strict types, unknown fields refused as OpenAI does:
"Unrecognized request argument", by protocol.py `parse_body`), and parameters this server does
not implement get a 400 that says so instead of being silently ignored (the ``UNSUPPORTED_*``
tables). Only their neutral values pass (e.g. ``logprobs: false``, ``frequency_penalty: 0``).
Every number is bounded here, at parse time, to what the engine takes (`INT32_MAX` for counts,
int64 for ``seed``, as OpenAI and vLLM).

The chat request and the completion request (completions.py) share `GenerationFields`: the
model, length, sampling, stop, choices, streaming and ``user`` fields, each declared once.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


INT32_MAX = 2**31 - 1  # counts (top_k, n, max_tokens, steps): the kernels take them as int32/int64
Count = Annotated[int, Field(le=INT32_MAX)]
Seed = Annotated[int, Field(ge=-2**63, le=2**63 - 1)]  # int64, as OpenAI and vLLM


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ImageURL(_Strict):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None  # accepted, no effect (one CLIP size)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    # OpenAI refuses an empty content array ("minimum length 1")
    content: Union[str, Annotated[list[ContentPart], Field(min_length=1)], None] = None
    name: Optional[str] = None  # accepted, not used by the template


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


class GenerationFields(_Strict):
    """The fields a chat and a completion request share (each declared here only): the model,
    the length, the sampling, stop strings, the choices, streaming and ``user``; protocol.py's
    `check_choices`, `check_stream_options`, `check_stops` and `check_sampling` read them.

    A subclass names all its fields, its own and these, in `FIELD_ORDER`: the order in which a
    request's faults rank (`protocol.parse_body` reports the first fault in that order). It keeps
    the order each request had on the wire before the two shared a base: pydantic lists every
    inherited field first, and a request with two faults would otherwise be refused for another
    one. A FIELD_ORDER that misses or repeats a field is refused when the class is made.
    """

    FIELD_ORDER: ClassVar[tuple[str, ...]] = ()

    model: str
    max_tokens: Optional[Count] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)  # <= ServeConfig.max_temperature
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[Count] = Field(None, ge=-1)  # extension (vLLM's name; -1 or 0: off)
    seed: Optional[Seed] = None
    stop: Union[str, list[str], None] = None
    n: Optional[Count] = Field(None, ge=1)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        fields = cls.model_fields
        if len(set(cls.FIELD_ORDER)) != len(cls.FIELD_ORDER) or set(cls.FIELD_ORDER) != set(fields):
            raise TypeError(f"{cls.__name__}.FIELD_ORDER must name each of its fields once; its "
                            f"fields: {sorted(fields)}, FIELD_ORDER: {list(cls.FIELD_ORDER)}")


class ChatCompletionRequest(GenerationFields):
    FIELD_ORDER = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature",
                   "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options", "modalities",
                   "user", "metadata", "num_inference_steps", "guidance_scale", "negative_prompt",
                   "max_images", "sampler")

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[Count] = Field(None, ge=1)
    modalities: Optional[list[Literal["text", "image"]]] = None
    metadata: Optional[dict[str, str]] = None
    # extensions for the images of an interleaved answer
    num_inference_steps: Optional[Count] = Field(None, ge=1)
    guidance_scale: Optional[float] = Field(None, ge=0)
    negative_prompt: Optional[str] = None
    max_images: Optional[Count] = Field(None, ge=0)
    sampler: Optional[Literal["ddpm", "dpmpp-2m", "unipc"]] = None  # default ddpm


class ImageGenerationRequest(_Strict):
    prompt: str = Field(min_length=1)
    model: Optional[str] = None
    n: Optional[Count] = Field(None, ge=1)
    size: Optional[str] = None
    response_format: Optional[Literal["b64_json", "url"]] = None
    output_format: Optional[Literal["png"]] = None
    user: Optional[str] = None
    # extensions (the DDPM sampler of the model's image head)
    num_inference_steps: Optional[Count] = Field(None, ge=1)
    guidance_scale: Optional[float] = Field(None, ge=0)
    negative_prompt: Optional[str] = None
    seed: Optional[Seed] = None
    sampler: Optional[Literal["ddpm", "dpmpp-2m", "unipc"]] = None  # default ddpm


# name -> (values that mean "off" and are accepted, why anything else is refused)
_NO = "is not supported by this server"
# sampling controls neither chat nor completions implement; parse_body checks a table in its
# order, so each table below keeps them at the place they always had
UNSUPPORTED_SAMPLING: dict[str, tuple[tuple, str]] = {
    "logit_bias": ((None, {}), f"logit_bias {_NO}"),
    "frequency_penalty": ((None, 0, 0.0), f"frequency_penalty {_NO}; leave it at 0"),
    "presence_penalty": ((None, 0, 0.0), f"presence_penalty {_NO}; leave it at 0"),
}
UNSUPPORTED_CHAT: dict[str, tuple[tuple, str]] = {
    "tools": ((None, []), f"tool calling {_NO}: DreamLLM was not trained to call tools"),
    "tool_choice": ((None, "none"), f"tool calling {_NO}"),
    "functions": ((None, []), f"function calling {_NO}"),
    "function_call": ((None, "none"), f"function calling {_NO}"),
    "parallel_tool_calls": ((None, True, False), ""),
    "logprobs": ((None, False), f"logprobs {_NO} (it returns text and images only)"),
    "top_logprobs": ((None, 0), f"top_logprobs {_NO}"),
    **UNSUPPORTED_SAMPLING,
    "response_format": ((None, {"type": "text"}), f"structured output (response_format) {_NO}"),
    "audio": ((None,), f"audio output {_NO}"),
    "prediction": ((None,), f"predicted outputs {_NO}"),
    "reasoning_effort": ((None,), f"reasoning_effort {_NO}: not a reasoning model"),
    "web_search_options": ((None,), f"web search {_NO}"),
    "store": ((None, False), f"stored completions {_NO}"),
    "service_tier": ((None, "auto", "default"), f"service tiers {_NO}"),
}
UNSUPPORTED_IMAGES: dict[str, tuple[tuple, str]] = {
    "stream": ((None, False), f"streamed image generation {_NO}"),
    "partial_images": ((None, 0), f"partial images {_NO}"),
    "quality": ((None, "auto", "standard"), f"quality settings {_NO}; use num_inference_steps"),
    "style": ((None,), f"style {_NO}"),
    "background": ((None, "auto", "opaque"), f"transparent backgrounds {_NO}"),
    "moderation": ((None, "auto", "low"), ""),
    "output_compression": ((None, 100), f"output_compression {_NO} (PNG only)"),
}
