"""Prometheus metrics, all named `auraserve_*`.

Counters and histograms are module-level objects: each event is counted in the process where
it happens (a job's terminal status in the process that committed it, a webhook attempt in the
process that sent it), so summing over processes gives the whole service. Gauges that describe
the shared store (queue depth, live workers) are not counted at all: `StoreCollector` samples
them from the store at scrape time, so every process answers the same and none drifts.

Several processes on one machine (`serve --api-processes N`): start them with
`PROMETHEUS_MULTIPROC_DIR` pointing at an empty directory (prometheus_client's multiprocess
mode; it must be set before the processes start, since the client picks its value store at
import). `/metrics` of any process then aggregates the counters and histograms of all of them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from auraserve.core.jobs import Job, JobStatus

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: from a status poll's few milliseconds to a queued job's many minutes.
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

JOBS_FINISHED = Counter(
    "auraserve_jobs_finished",
    "Jobs that reached a terminal status, by model and status",
    ["model", "status"],
)
JOB_QUEUED_SECONDS = Histogram(
    "auraserve_job_queued_seconds",
    "Time from submit to the (last) claim, observed when the job ends",
    ["model"],
    buckets=_DURATION_BUCKETS,
)
JOB_RUNNING_SECONDS = Histogram(
    "auraserve_job_running_seconds",
    "Time from the (last) claim to the terminal status, observed when the job ends",
    ["model"],
    buckets=_DURATION_BUCKETS,
)
JOB_TOTAL_SECONDS = Histogram(
    "auraserve_job_total_seconds",
    "Time from submit to the terminal status",
    ["model"],
    buckets=_DURATION_BUCKETS,
)
CREDITS_CAPTURED = Counter(
    "auraserve_credits_captured", "Credits charged for COMPLETED jobs (ledger captures)"
)
CREDITS_RELEASED = Counter(
    "auraserve_credits_released",
    "Credits given back for FAILED, ERROR and CANCELLED jobs (ledger releases)",
)
BATCH_SIZE = Histogram(
    "auraserve_worker_batch_size",
    "Jobs per batch a worker ran",
    ["model", "device"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)
STEPS_PER_SECOND = Histogram(
    "auraserve_worker_steps_per_second",
    "Sampling steps per second of engine time, per batch",
    ["model", "device"],
    buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256),
)
CHECKPOINTS_WRITTEN = Counter(
    "auraserve_worker_checkpoints",
    "Step checkpoints a worker saved, by outcome: saved, refused (the job was no longer its "
    "own), failed (the media store or database could not take it)",
    ["outcome"],
)
CHECKPOINT_BYTES_WRITTEN = Counter(
    "auraserve_worker_checkpoint_bytes", "Bytes of step checkpoints a worker saved"
)
PREVIEWS_POSTED = Counter(
    "auraserve_worker_previews",
    "Live previews a worker posted for a job (made only while a status stream watches it)",
)
CHECKPOINT_SECONDS = Histogram(
    "auraserve_worker_checkpoint_seconds",
    "Time to save one step checkpoint (media store write and fenced row), per checkpoint",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
WEBHOOK_ATTEMPTS = Counter(
    "auraserve_webhook_attempts",
    "Webhook delivery attempts by outcome (delivered, retry, gone)",
    ["outcome"],
)
HTTP_REQUESTS = Counter(
    "auraserve_http_requests",
    "HTTP requests by method, route template and status",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "auraserve_http_request_duration_seconds",
    "Time to the end of the response, by method and route template",
    ["method", "route"],
    buckets=_HTTP_BUCKETS,
)
STORE_UNAVAILABLE = Counter(
    "auraserve_store_unavailable",
    "Operations refused because the database could not be reached, by component",
    ["component"],
)

_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe_transition(job: Job) -> None:
    """Count a committed status change (registered by `store.db.Store`)."""
    if not job.is_terminal:
        return
    model = job.model_id
    JOBS_FINISHED.labels(model, job.status.value).inc()
    if job.status == JobStatus.COMPLETED:
        CREDITS_CAPTURED.inc(job.price)
    else:
        CREDITS_RELEASED.inc(job.price)
    end = job.completed_at if job.completed_at is not None else job.updated_at
    JOB_TOTAL_SECONDS.labels(model).observe(max(0.0, end - job.created_at))
    if job.started_at is not None:
        JOB_QUEUED_SECONDS.labels(model).observe(max(0.0, job.started_at - job.created_at))
        JOB_RUNNING_SECONDS.labels(model).observe(max(0.0, end - job.started_at))


def observe_batch(model: str, jobs: int, steps: int, engine_seconds: float, *, device: str) -> None:
    """One batch a worker ran: its size, and its sampling speed, per device ("cpu", "cuda",
    or "gpu3" for a worker pinned to GPU 3 by `--gpus`)."""
    BATCH_SIZE.labels(model, device).observe(jobs)
    if engine_seconds > 0 and steps > 0:
        STEPS_PER_SECOND.labels(model, device).observe(steps / engine_seconds)


def observe_checkpoint(outcome: str, size: int = 0, seconds: float = 0.0) -> None:
    CHECKPOINTS_WRITTEN.labels(outcome).inc()
    if outcome == "saved":
        CHECKPOINT_BYTES_WRITTEN.inc(size)
        CHECKPOINT_SECONDS.observe(seconds)


def observe_webhook(outcome: str) -> None:
    WEBHOOK_ATTEMPTS.labels(outcome).inc()


class HttpMetrics:
    """Per-request counting for the API's middleware, with the labelled children cached: the
    hot path (status polls) pays two dictionary lookups, not prometheus_client's label checks."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], Callable[[], None]] = {}
        self._durations: dict[tuple[str, str], Callable[[float], None]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in _HTTP_METHODS:
            method = "other"
        key = (method, route, status)
        inc = self._counts.get(key)
        if inc is None:
            inc = self._counts[key] = HTTP_REQUESTS.labels(method, route, str(status)).inc
        inc()
        observe = self._durations.get((method, route))
        if observe is None:
            observe = HTTP_DURATION.labels(method, route).observe
            self._durations[(method, route)] = observe
        observe(seconds)


# --- the store, sampled at scrape time ----------------------------------------------------------


@dataclass(frozen=True)
class ModelQueue:
    queued: int = 0
    processing: int = 0
    oldest_queued_at: float | None = None


@dataclass(frozen=True)
class StoreSample:
    """What `StoreCollector` exports; built by a store query (`store.stats.sample`)."""

    models: Mapping[str, ModelQueue] = field(default_factory=dict)
    live_workers: int = 0
    # Bytes of running jobs' step checkpoints in the media store (one per job at most).
    checkpoint_bytes: int = 0
    taken_at: float = field(default_factory=time.time)


class StoreCollector(Collector):
    """Queue depth, oldest queued age and running jobs per model, and live workers.

    The sample is cached for `ttl` seconds, so several scrapers (or several replicas' scrapes
    of one store) cost one query each per `ttl`. A failed sample exports `auraserve_store_up 0`
    and nothing else: /metrics keeps answering during a database outage.
    """

    def __init__(
        self,
        sample: Callable[[], StoreSample],
        *,
        models: Iterable[str] = (),
        ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sample = sample
        self._models = tuple(models)
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, StoreSample | None] | None = None

    def current(self) -> StoreSample | None:
        """The cached sample, refreshed when older than `ttl`; None when the store failed."""
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] >= self._ttl:
                try:
                    value: StoreSample | None = self._sample()
                except Exception:  # an outage must not break /metrics; store_up says it
                    STORE_UNAVAILABLE.labels("metrics").inc()
                    value = None
                self._cached = (now, value)
            return self._cached[1]

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no names claimed at registration: nothing is queried then

    def collect(self) -> Iterator[Metric]:
        sample = self.current()
        yield GaugeMetricFamily(
            "auraserve_store_up",
            "1 when the last store sample succeeded, 0 when the database was unreachable",
            value=0 if sample is None else 1,
        )
        if sample is None:
            return
        depth = GaugeMetricFamily(
            "auraserve_queue_depth", "Jobs QUEUED, per model", labels=["model"]
        )
        oldest = GaugeMetricFamily(
            "auraserve_queue_oldest_age_seconds",
            "Age of the oldest QUEUED job, per model (0 when none is queued)",
            labels=["model"],
        )
        running = GaugeMetricFamily(
            "auraserve_jobs_processing", "Jobs PROCESSING, per model", labels=["model"]
        )
        for model in sorted({*self._models, *sample.models}):
            queue = sample.models.get(model, ModelQueue())
            depth.add_metric([model], queue.queued)
            age = 0.0
            if queue.oldest_queued_at is not None:
                age = max(0.0, sample.taken_at - queue.oldest_queued_at)
            oldest.add_metric([model], age)
            running.add_metric([model], queue.processing)
        yield depth
        yield oldest
        yield running
        yield GaugeMetricFamily(
            "auraserve_workers_live",
            "Workers heard from within AURASERVE_WORKER_STALE_SECONDS",
            value=sample.live_workers,
        )
        yield GaugeMetricFamily(
            "auraserve_checkpoint_bytes_stored",
            "Bytes of running jobs' step checkpoints held in the media store",
            value=sample.checkpoint_bytes,
        )


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def exposition(*extra: CollectorRegistry) -> bytes:
    """The text exposition: this process's metrics (or, in multiprocess mode, every process's
    aggregated from PROMETHEUS_MULTIPROC_DIR), then the `extra` registries (store samples)."""
    if multiprocess_dir() is not None:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    return body + b"".join(generate_latest(r) for r in extra)


def mark_process_dead(pid: int | None = None) -> None:
    """In multiprocess mode, drop a stopped process's live-gauge files (call at exit)."""
    if multiprocess_dir() is not None:
        _multiprocess.mark_process_dead(pid if pid is not None else os.getpid())  # type: ignore[no-untyped-call]
