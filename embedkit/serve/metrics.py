"""The service's Prometheus metrics (``prometheus-client``), one registry per app."""
from __future__ import annotations

import time
from typing import Any

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Counters and histograms of ``embedkit serve``.

    ``embedkit_requests_total{route,status}``, ``embedkit_request_seconds{route}`` (histogram),
    ``embedkit_batch_size{model}`` (items per model batch, histogram), ``embedkit_batch_seconds{model}``,
    ``embedkit_queue_depth{model}`` (items waiting now), ``embedkit_items_embedded_total{model}``,
    ``embedkit_item_errors_total{code}``, ``embedkit_items_dropped_total{model}`` (queued items of
    clients that went away), ``embedkit_inflight_image_bytes`` (decoded image bytes the requests in
    flight hold now, see :mod:`embedkit.serve.image_budget`).
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series only double the output

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("embedkit_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("embedkit_request_seconds", "request latency in seconds", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("embedkit_batch_size", "items per model batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("embedkit_batch_seconds", "model run time per batch in seconds", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("embedkit_queue_depth", "items queued for a model batch", ["model"], registry=r)
        self.embedded = Counter("embedkit_items_embedded", "items embedded", ["model"], registry=r)
        self.item_errors = Counter("embedkit_item_errors", "items that failed, by error code", ["code"], registry=r)
        self.dropped = Counter("embedkit_items_dropped", "queued items dropped because the client went away",
                               ["model"], registry=r)
        self.image_bytes = Gauge("embedkit_inflight_image_bytes", "decoded image bytes held by requests in flight",
                                 registry=r)

    @staticmethod
    def timer() -> float:
        return time.perf_counter()

    def request(self, route: str, status: int, start: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - start)

    def batch(self, model: str, items: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(items)
        self.batch_seconds.labels(model).observe(seconds)

    def render(self, service: Any) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for name, depth in service.depths().items():
            self.queue_depth.labels(name).set(depth)
        self.image_bytes.set(service.image_budget.used)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
