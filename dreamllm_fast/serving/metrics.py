"""/metrics: Prometheus text through prometheus-client, one registry per app.

Two sources:
- the HTTP layer observes what only it sees: time to first token (request arrival to the first
  text or image sent), latency (arrival to the last byte), and requests by route and status;
- `Scheduler.stats()` is read at scrape time by a collector (queue depth, running sequences, KV
  slots, tokens/s over the last 10 s, token and image counters, seconds per pipeline stage), so any
  scheduler that fills `SchedulerStats` shows up the same way.

A registry per app (not the process-global one) lets several apps live in one process (tests, a
Ray Serve replica beside other deployments) without duplicate-metric errors.
"""
from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .scheduler import SchedulerStats

PREFIX = "dreamllm"
# Seconds. TTFT spans a 7B GPU prefill (~15 ms) to a queued CPU request (minutes); latency also
# covers a 50-step text-to-image (~0.6 s on an H100 target) and long interleaved answers.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _SchedulerCollector:
    def __init__(self, stats: Callable[[], Optional[SchedulerStats]]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        if s is None:
            return
        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["scheduler"])
            g.add_metric([s.scheduler], value)
            return g

        yield gauge("ready", "1 once weights are loaded and warm-up ran", float(s.ready))
        yield gauge("queue_depth", "requests waiting for the model", s.queue_depth)
        yield gauge("queue_capacity", "most requests that may wait (--max-queue)", s.max_queue)
        yield gauge("running_sequences", "sequences being generated now", s.running)
        yield gauge("kv_slots_used", "KV-cache slots held by sequences", s.kv_slots_used)
        yield gauge("kv_slots_total", "KV-cache slots in all", s.kv_slots_total)
        yield gauge("tokens_per_second", "generated tokens per second over the last 10 s",
                    s.tokens_per_second)
        for name, doc, v in (
                ("generated_tokens", "tokens generated", s.generated_tokens),
                ("prompt_tokens", "prompt tokens processed (image spans included)", s.prompt_tokens),
                ("images_generated", "images drawn (interleaved and text-to-image)", s.images_generated)):
            c = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["scheduler"])
            c.add_metric([s.scheduler], v)
            yield c
        c = CounterMetricFamily(f"{PREFIX}_scheduler_requests", "requests by outcome",
                                labels=["scheduler", "outcome"])
        for outcome, v in sorted(s.requests.items()):
            c.add_metric([s.scheduler, outcome], v)
        yield c
        c = CounterMetricFamily(f"{PREFIX}_stage_seconds", "seconds spent per pipeline stage",
                                labels=["scheduler", "stage"])
        for stage, v in sorted(s.stage_seconds.items()):
            c.add_metric([s.scheduler, stage], v)
        yield c


class ServingMetrics:
    def __init__(self, stats: Callable[[], Optional[SchedulerStats]]):
        self.registry = CollectorRegistry()
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "request arrival to the first text or image sent", ["route"],
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds",
                                 "request arrival to the last byte of the answer", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.registry.register(_SchedulerCollector(stats))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
