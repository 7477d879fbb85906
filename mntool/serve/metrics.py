"""What the patch service counts, as Prometheus metrics: the one home of the metric names.

Requests by endpoint and status, patches served by artifact fingerprint (a fleet moving from one
model version to the next, docs/serving.md), request latency, batch sizes and batch time, the
queue depth and each worker's start time, kept by the Prometheus client library. With several worker
processes `serve` points $PROMETHEUS_MULTIPROC_DIR at a directory of its own and the library's
multi-process mode sums the workers' counts, so one scrape of /metrics, whichever worker answers
it, sees the whole server. Only the start time keeps a `pid` label (one series per worker).
"""

from __future__ import annotations

import glob
import os
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from mntool.serve import routes

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # the library's own switch to multi-process mode
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUESTS = "mntool_requests_total"  # {endpoint, status}
PATCHES = "mntool_patches_total"  # {fingerprint}: only served fingerprints, so the label set is bounded
REQUEST_SECONDS = "mntool_request_seconds"  # histogram {endpoint}
BATCH_SIZE = "mntool_batch_size"  # histogram
BATCH_SECONDS = "mntool_batch_seconds"  # histogram
QUEUE_WAITING = "mntool_queue_waiting"  # gauge, summed over live workers
START_TIME = "mntool_start_time_seconds"  # gauge {pid}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # requests per generator call

disable_created_metrics()  # no *_created series: start times are mntool_start_time_seconds


class ServiceMetrics:
    """The metrics of one worker process; in multi-process mode its values live in the shared
    directory and `render` reads every worker's."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.registry = CollectorRegistry()
        shared = os.environ.get(MULTIPROC_ENV)
        if shared:
            _forget_dead_workers(shared)
            multiprocess.MultiProcessCollector(self.registry, shared)
        own = None if shared else self.registry  # multi-process values are read back from the files
        self.requests = Counter(
            REQUESTS,
            "HTTP requests answered, by endpoint and status (499: client went away).",
            ["endpoint", "status"],
            registry=own,
        )
        self.patches = Counter(
            PATCHES,
            "Patches built, by the fingerprint of the artifact they are for (every served one listed).",
            ["fingerprint"],
            registry=own,
        )
        self._patches: dict[str, Counter] = {}
        self.latency = Histogram(
            REQUEST_SECONDS,
            "Time from request start to the end of the response.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.batch_size = Histogram(
            BATCH_SIZE, "Patch requests served by one generator call.", buckets=BATCH_BUCKETS, registry=own
        )
        self.batch_seconds = Histogram(
            BATCH_SECONDS, "Time to generate and build the patches of one batch.", buckets=LATENCY_BUCKETS, registry=own
        )
        self.queue = Gauge(
            QUEUE_WAITING,
            "Patch requests waiting for a batch, when the last batch was taken.",
            multiprocess_mode="livesum",
            registry=own,
        )
        about = "When each worker started (Unix time)."
        if shared:  # the library adds the pid label itself
            Gauge(START_TIME, about, multiprocess_mode="all", registry=None).set(time.time())
        else:
            Gauge(START_TIME, about, ["pid"], registry=own).labels(str(self.pid)).set(time.time())
        self.queue_waiting = lambda: 0  # replaced by the service with its batcher's queue depth
        self._children: dict[tuple[str, int], tuple] = {}

    @staticmethod
    def endpoint(path: str) -> str:
        """The label for a request path; unknown paths share one label so scans cannot explode it."""
        return path if path in routes.ALL else "other"

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        key = (self.endpoint(path), status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds a key each time: look each pair up once
            children = self._children[key] = (self.requests.labels(key[0], str(status)), self.latency.labels(key[0]))
        children[0].inc()
        children[1].observe(seconds)

    def serve_fingerprints(self, fingerprints) -> None:
        """Every served fingerprint's patch counter, shown from the start (at 0)."""
        for fingerprint in fingerprints:
            self._patches[fingerprint] = self.patches.labels(fingerprint)
            self._patches[fingerprint].inc(0)

    def observe_patch(self, fingerprint: str) -> None:
        counter = self._patches.get(fingerprint)
        if counter is None:  # only served fingerprints get patches, so the label set stays bounded
            counter = self._patches[fingerprint] = self.patches.labels(fingerprint)
        counter.inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.queue.set(self.queue_waiting())

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _forget_dead_workers(shared: str) -> None:
    """A worker uvicorn replaced (it died) must not keep adding its last queue depth."""
    for path in glob.glob(os.path.join(shared, "gauge_live*_*.db")):
        pid = int(os.path.basename(path).rsplit("_", 1)[1].removesuffix(".db"))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, shared)
        except PermissionError:
            pass  # alive, someone else's
