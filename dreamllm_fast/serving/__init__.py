"""OpenAI-compatible serving (`dreamllm-fast serve`; the optional extra ``serve``).

    from dreamllm_fast.serving import BatchedScheduler, ServeConfig, create_app, serving_engine_config
    cfg = serving_engine_config(max_batch=8)
    sched = BatchedScheduler(lambda: DreamLLMPipeline.from_pretrained(ckpt, engine_config=cfg),
                             max_batch=8, max_queue=64)
    app = create_app(sched, ServeConfig(model_name="dreamllm", api_key=None))  # run with uvicorn

scheduler.py is the interface (requests, events, stats) between the HTTP layer and whatever owns
the model; batched.py batches many requests through the one decode loop (continuous batching);
sequential.py serves one request at a time through `DreamLLMPipeline` (the baseline).
"""
from .media import MediaLimits
from .protocol import ServeConfig
from .scheduler import (ChoiceDone, GenerationRequest, Health, ImageOptions, ImageResult,
                        NotReadyError, QueueFullError, RequestFailed, RequestHandle, Scheduler,
                        SchedulerStats, TextDelta)
from .worker import WorkerScheduler
from .batched import BatchedScheduler, serving_engine_config
from .sequential import SequentialScheduler


def create_app(*args, **kwargs):
    """`app.create_app` (imported lazily: FastAPI is needed only to serve)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["BatchedScheduler", "ChoiceDone", "GenerationRequest", "Health", "ImageOptions",
           "ImageResult", "MediaLimits", "NotReadyError", "QueueFullError", "RequestFailed", "RequestHandle",
           "Scheduler", "SchedulerStats", "SequentialScheduler", "ServeConfig", "TextDelta",
           "WorkerScheduler", "create_app", "serving_engine_config"]
