"""The scheduler interface: what the HTTP layer needs from whatever owns the model.

The HTTP layer (app.py) knows nothing about sessions, KV slots or batching. It turns an OpenAI
request into a `GenerationRequest`, hands it to `Scheduler.submit`, and reads the returned
`RequestHandle` as an async stream of events until it ends:

    TextDelta(index, text)            a piece of choice `index`'s text (stop strings applied by the
                                      decode loop, dreamllm_fast/decoding.py)
    ImageResult(index, image)         a whole PIL image of choice `index` (interleaved or images)
    ChoiceDone(index, finish_reason, completion_tokens, text)   choice `index` is complete;
                                      `text`: its last piece, if any (streamed with the
                                      finish_reason, as vLLM's last chunk carries it)
    RequestFailed(error)              the whole request failed; nothing follows

Two schedulers implement it: `SequentialScheduler` (sequential.py: one request at a time through
`DreamLLMPipeline`, the baseline) and `BatchedScheduler` (batched.py: continuous batching). Both
share `RequestHandle` (the thread-to-asyncio event channel) and `SchedulerStats` from this module,
and the worker lifecycle of worker.py, so the HTTP layer and /metrics cannot tell them apart.

Contract every scheduler keeps:
- `submit` validates everything it can before queueing (prompt length against the context,
  sampling and diffusion settings), so a bad request fails with an error and never streams;
- a full queue raises `QueueFullError` at once (HTTP 429 with Retry-After), never blocks;
- `handle.cancel()` (client gone) frees the request's queue place or KV slot promptly;
- choice i of a request with seed s draws from `torch.Generator(device).manual_seed(s + i)` (the
  model's device), so a seeded request is reproducible and equals the single-request pipeline
  output with that generator;
- after any error the scheduler keeps serving, except one that leaves the GPU context unusable
  (`devices.device_failed`): then `health()` turns failed for good (restart the process).
"""
from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Optional, Sequence, Union

from ..errors import DreamLLMError
from ..sampling import SamplingParams

Kind = Literal["chat", "interleaved", "image", "completion"]
log = logging.getLogger("dreamllm_fast.serving")


# -- errors the HTTP layer maps to status codes ---------------------------------------------------
class QueueFullError(DreamLLMError):
    """The waiting queue is full (HTTP 429). `retry_after` is a hint in whole seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class NotReadyError(DreamLLMError):
    """The model is still loading, failed to load, or the scheduler is shutting down (HTTP 503)."""


# -- requests --------------------------------------------------------------------------------------
@dataclass
class ImageOptions:
    """Diffusion settings: of every image of an interleaved answer, or of an images request."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: Optional[str] = None
    max_images: int = 4  # interleaved answers only
    size: Optional[tuple[int, int]] = None  # (width, height); None: the model's default
    sampler: str = "ddpm"  # diffusion.SAMPLERS; ddpm is the original's


@dataclass
class GenerationRequest:
    """One OpenAI request in the engine's terms (no HTTP objects).

    messages: pipeline-format messages (role + content of text strings and PIL images) for
    "chat" and "interleaved"; prompt: the text of an "image" request; content: the raw prompt of
    a "completion" (`DreamLLMPipeline.complete`: no chat template; `<dream_start>` ends it). max_new_tokens None means
    "up to the context" (OpenAI's default). seeds: one per choice (len == n).
    """

    kind: Kind
    seeds: Sequence[int]
    messages: Optional[list[dict]] = None
    prompt: Optional[str] = None
    content: Optional[list] = None  # "completion": the raw prompt, text strings and PIL images
    max_new_tokens: Optional[int] = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    image: ImageOptions = field(default_factory=ImageOptions)
    request_id: str = ""

    @property
    def n(self) -> int:
        return len(self.seeds)


# -- events ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ImageResult:
    index: int
    image: Any  # PIL.Image.Image


@dataclass(frozen=True)
class ChoiceDone:
    index: int
    finish_reason: Literal["stop", "length", "cancelled"]
    completion_tokens: int
    text: str = ""


@dataclass(frozen=True)
class RequestFailed:
    error: BaseException


Event = Union[TextDelta, ImageResult, ChoiceDone, RequestFailed]
_END = object()
_ids = itertools.count()


class RequestHandle:
    """The stream of one request's events, fed from any thread and read on the event loop.

    The producer (a worker thread) calls `emit` and finally `close`; the consumer iterates with
    `async for`. `cancel()` may be called from anywhere, any number of times.
    """

    def __init__(self, request: GenerationRequest, prompt_tokens: int,
                 loop: Optional[asyncio.AbstractEventLoop] = None):
        self.request = request
        self.request_id = request.request_id or f"req-{next(_ids)}"
        self.prompt_tokens = prompt_tokens
        self.submitted = time.monotonic()
        self._loop = loop or asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._closed = False
        self._on_cancel: Optional[Callable[["RequestHandle"], None]] = None

    # producer side (thread-safe)
    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.emit(_END)  # type: ignore[arg-type]

    # consumer side
    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._on_cancel is not None:
                self._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        while True:
            ev = await self._events.get()
            if ev is _END:
                return
            yield ev


# -- stats -----------------------------------------------------------------------------------------
@dataclass
class SchedulerStats:
    """A snapshot for /metrics and the load benchmark. Counters are cumulative since start."""

    scheduler: str
    ready: bool
    queue_depth: int
    max_queue: int
    running: int  # sequences being generated now
    kv_slots_used: int
    kv_slots_total: int
    tokens_per_second: float  # generated tokens, sliding window
    generated_tokens: int = 0
    prompt_tokens: int = 0
    images_generated: int = 0
    requests: dict = field(default_factory=dict)  # outcome -> count (ok/cancelled/failed/rejected)
    stage_seconds: dict = field(default_factory=dict)  # pipeline stage -> seconds


@dataclass
class Health:
    ready: bool
    detail: str
    failed: bool = False  # loading failed: this replica will never be ready (replace it)


class Scheduler(abc.ABC):
    """Owns the model; admits, runs and streams requests. See the module docstring."""

    name: str = "scheduler"

    @abc.abstractmethod
    def start(self) -> None:
        """Load and warm up in the background; returns at once. `health()` turns ready after."""

    @abc.abstractmethod
    def health(self) -> Health:
        """Ready only after weights are loaded and warm-up (graph capture) ran."""

    @abc.abstractmethod
    async def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate and enqueue. Raises InvalidInputError (incl. ContextOverflowError),
        QueueFullError or NotReadyError; never blocks on the model."""

    @abc.abstractmethod
    def stats(self) -> SchedulerStats:
        ...

    @abc.abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel queued and running requests, stop the worker, free the model."""

    @property
    @abc.abstractmethod
    def max_context(self) -> int:
        """The model's context in tokens (valid once ready)."""

    @property
    def image_tokens(self) -> int:
        """Prompt tokens one input image takes (its span), valid once ready; 0: unknown."""
        return 0

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Block until ready (or failed, or timeout); returns `health().ready`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.health().ready:
            if self.health().failed or (deadline and time.monotonic() > deadline):
                break
            time.sleep(0.02)
        return self.health().ready
