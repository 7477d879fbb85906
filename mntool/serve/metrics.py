"""What the patch service counts, and its Prometheus text rendering (exposition format 0.0.4).

Requests by endpoint and status, request latency, batch sizes and batch generation time, and the
queue depth. Each worker process counts its own; every series carries the worker's `pid` label so
scrapes of different workers (or replicas) never collide.
"""
from __future__ import annotations

import bisect
import os
import time
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # requests per generator call
ENDPOINTS = ("/v1/patches", "/v1/artifacts", "/healthz", "/metrics", "/openapi.json")


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), +Inf last
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def render(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        lines, cumulative = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
        lines.append(f"{name}_sum{{{labels}}} {self.total:.6f}")
        lines.append(f"{name}_count{{{labels}}} {cumulative}")
        return lines


class ServiceMetrics:
    """Counters and histograms of one worker process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.started = time.time()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)
        self.queue_waiting = lambda: 0  # replaced by the service with its batcher's queue depth

    @staticmethod
    def endpoint(path: str) -> str:
        """The label for a request path; unknown paths share one label so scans cannot explode it."""
        return path if path in ENDPOINTS else "other"

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = self.endpoint(path)
        self.requests[(endpoint, status)] += 1
        if endpoint not in self.latency:
            self.latency[endpoint] = Histogram(LATENCY_BUCKETS)
        self.latency[endpoint].observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> str:
        pid = f'pid="{self.pid}"'
        lines = [
            "# HELP mntool_requests_total HTTP requests answered, by endpoint and status (499: client went away).",
            "# TYPE mntool_requests_total counter",
        ]
        for (endpoint, status), count in sorted(self.requests.items()):
            lines.append(f'mntool_requests_total{{{pid},endpoint="{endpoint}",status="{status}"}} {count}')
        lines += ["# HELP mntool_request_seconds Time from request start to the end of the response.",
                  "# TYPE mntool_request_seconds histogram"]
        for endpoint, hist in sorted(self.latency.items()):
            lines += hist.render("mntool_request_seconds", f'{pid},endpoint="{endpoint}"')
        lines += ["# HELP mntool_batch_size Patch requests served by one generator call.",
                  "# TYPE mntool_batch_size histogram", *self.batch_size.render("mntool_batch_size", pid),
                  "# HELP mntool_batch_seconds Time to generate and build the patches of one batch.",
                  "# TYPE mntool_batch_seconds histogram", *self.batch_seconds.render("mntool_batch_seconds", pid),
                  "# HELP mntool_queue_waiting Patch requests waiting for a batch.",
                  "# TYPE mntool_queue_waiting gauge", f"mntool_queue_waiting{{{pid}}} {self.queue_waiting()}",
                  "# HELP mntool_start_time_seconds When this worker started (Unix time).",
                  "# TYPE mntool_start_time_seconds gauge", f"mntool_start_time_seconds{{{pid}}} {self.started:.3f}"]
        return "\n".join(lines) + "\n"
