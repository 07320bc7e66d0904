"""One place that turns serving settings into a scheduler: `dreamllm-fast serve` and the Ray
Serve replicas (serving/ray_app.py) both call `build_scheduler`, so the two serve alike."""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..errors import InvalidInputError
from .scheduler import Scheduler

DEFAULT_MAX_BATCH = 8
SCHEDULER_NAMES = ("batched", "sequential")

# load(engine_config=None) -> DreamLLMPipeline; engine_config is None or an `EngineConfig`
Loader = Callable[..., Any]


def pipeline_loader(settings) -> Loader:
    """`load(engine_config=None)` for a scheduler: the pipeline `settings` names (an object with
    `dreamllm-fast serve`'s checkpoint, device, dtype, backend, unet_backend, vae_backend and weights:
    the parsed flags, or Ray's `RayServeArgs`), built on the scheduler's worker thread."""
    def load(engine_config=None):
        from ..pipeline import DreamLLMPipeline

        return DreamLLMPipeline.from_pretrained(
            settings.checkpoint, device=settings.device, dtype=settings.dtype,
            backend=settings.backend, unet_backend=settings.unet_backend,
            vae_backend=settings.vae_backend, progress=False, engine_config=engine_config,
            weights=settings.weights)

    return load


def build_scheduler(name: str, load: Loader, *, max_queue: int = 64, max_batch: Optional[int] = None,
                    prefill_chunk: Optional[int] = None, image_batch: Optional[int] = None,
                    warmup: bool = True, device=None, dtype=None) -> Scheduler:
    """name "batched" (continuous batching; the default): the engine is loaded with `max_batch`
    KV slots (default 8) and decode graphs up to that size. "sequential": one request at a time
    through `DreamLLMPipeline` (max_batch, prefill_chunk and image_batch do not apply)."""
    if name == "batched":
        from .batched import BatchedScheduler, serving_engine_config

        n = DEFAULT_MAX_BATCH if max_batch is None else max_batch
        cfg = serving_engine_config(n, device, dtype)
        return BatchedScheduler(lambda: load(engine_config=cfg), max_queue=max_queue, max_batch=n,
                                prefill_chunk=prefill_chunk, max_images=image_batch or n,
                                warmup=warmup)
    if name == "sequential":
        from .sequential import SequentialScheduler

        return SequentialScheduler(load, max_queue=max_queue, warmup=warmup)
    raise InvalidInputError(f"unknown scheduler {name!r}: use one of {SCHEDULER_NAMES}")
