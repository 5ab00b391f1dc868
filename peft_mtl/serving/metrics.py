"""Prometheus metrics of one server: requests, rows, latency, batch sizes, queue time, sets loaded."""

from __future__ import annotations

import time
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .worker import BatchStats


class ServerMetrics:
    """The server's own registry (never the process-global one), so several apps in one process
    (tests, benchmarks) each count their own traffic."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("peft_mtl_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.rows = Counter("peft_mtl_rows", "inputs answered", ["endpoint"], registry=self.registry)
        self.latency = Histogram("peft_mtl_request_seconds", "request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_rows = Histogram("peft_mtl_batch_rows", "rows per forward pass", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_seconds = Histogram("peft_mtl_queue_seconds", "time a request waited for its batch",
                                       registry=self.registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                                        0.25, 1))
        self.loaded_sets = Gauge("peft_mtl_loaded_sets", "adapter sets loaded", registry=self.registry)

    def on_batch(self, stats: BatchStats) -> None:
        """The worker's report of one forward pass."""
        self.batch_rows.observe(stats.rows)
        for q in stats.queue_seconds:
            self.queue_seconds.observe(q)

    async def count_request(self, request, call_next):
        """HTTP middleware: every request counted by route and status, and timed."""
        started = time.perf_counter()
        response = await call_next(request)
        endpoint = request.scope.get("route").path if request.scope.get("route") else "other"
        self.requests.labels(endpoint, str(response.status_code)).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    def text(self) -> str:
        return generate_latest(self.registry).decode()
