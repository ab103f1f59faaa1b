"""Prometheus metrics of one replica (prometheus-client, text format at ``GET /metrics``).

Each :class:`ServeMetrics` has its own ``CollectorRegistry`` (not the process-global
default), so several apps in one process (tests, a Ray replica beside others) never
collide. prometheus-client's metric objects are thread-safe: the event loop and the worker
thread both update them without further locking.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: Seconds: from a 10 ms CPU tiny step to several minutes of full-size CPU sampling.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)


class ServeMetrics:
    """Counters and histograms the server exports; ``render()`` gives the scrape body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float] | None = None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sdxl_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.request_seconds = Histogram("sdxl_request_seconds", "End-to-end request latency", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("sdxl_queue_wait_seconds", "Time an image waited before its batch ran",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("sdxl_stage_seconds",
                                       "Time per pipeline stage per batch call (UNets: all steps)", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("sdxl_batch_size", "Images per pipeline call",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.images = Counter("sdxl_images_generated", "Images generated", registry=r)
        self.errors = Counter("sdxl_errors", "Errors by kind", ["kind"], registry=r)
        self.queue_depth = Gauge("sdxl_queue_depth", "Images waiting for a batch", registry=r)
        self.running = Gauge("sdxl_images_running", "Images in the batch running now", registry=r)
        self.ready = Gauge("sdxl_ready", "1 when the pipeline is loaded and warmed up", registry=r)
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)

    def observe_stages(self, stages: dict[str, list[float]]) -> None:
        for stage, values in stages.items():
            self.stage_seconds.labels(stage=stage).observe(float(sum(values)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
