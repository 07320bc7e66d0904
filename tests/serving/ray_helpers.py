"""Imported inside Ray Serve replicas by tests/serving/test_ray_serve.py (the test's Ray instance
puts this folder on the workers' PYTHONPATH): a scheduler whose engine can be made to fail.

`failing_scheduler` is a scheduler factory for `RayServeArgs.scheduler`
("ray_helpers:failing_scheduler"). The test drops a file named ``fail-next`` into the folder named
by $DREAMLLM_RAY_TEST_FLAGS; the first replica whose `health()` sees it claims it (an atomic
rename to ``failed-<replica id>``, so exactly one replica fails) and from then on reports a failed
engine, as a real engine would after, e.g., a CUDA error. Replicas started later stay healthy.
"""
import os

from dreamllm_fast.serving import Health, Scheduler, SequentialScheduler

FLAGS_ENV = "DREAMLLM_RAY_TEST_FLAGS"


class FailableScheduler(Scheduler):
    name = "failable"

    def __init__(self, inner: Scheduler):
        self.inner = inner
        self.failed = False

    def _replica(self) -> str:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id

    def health(self) -> Health:
        flags = os.environ.get(FLAGS_ENV)
        if not self.failed and flags and self.inner.health().ready:
            try:
                os.rename(os.path.join(flags, "fail-next"),
                          os.path.join(flags, f"failed-{self._replica()}"))
                self.failed = True
            except FileNotFoundError:
                pass
        if self.failed:
            return Health(False, "injected engine failure (test)", failed=True)
        return self.inner.health()

    def start(self):
        self.inner.start()

    async def submit(self, request):
        return await self.inner.submit(request)

    def stats(self):
        return self.inner.stats()

    def shutdown(self, timeout: float = 10.0):
        self.inner.shutdown(timeout)

    @property
    def max_context(self) -> int:
        return self.inner.max_context


def failing_scheduler(load, args) -> Scheduler:
    return FailableScheduler(SequentialScheduler(load, max_queue=args.max_queue,
                                                 warmup=args.warmup))
