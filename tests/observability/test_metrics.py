"""The `auraserve_*` metrics, read back from a live server's /metrics on both stores.

The counters live in the process-wide registry, so each test compares before and after."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from auraserve.observability.metrics import ModelQueue, StoreCollector, StoreSample
from auraserve.store import workers as registry
from auraserve.store.schema import workers
from tests.conftest import LiveServer, Tenant, wait_for_status

MODEL = "auraflow-v0-3-512"
SUBMIT = f"/{MODEL}/v1/auraflow-v0-3-request"
JOB_BODY = {"prompt": "a lighthouse", "num_inference_steps": 2, "expand_prompt": False}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def scrape(client: httpx.Client) -> Samples:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return parse(resp.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_completed_job_is_counted_timed_and_charged(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    before = scrape(client)
    resp = client.post(SUBMIT, headers=tenant.headers, json=JOB_BODY)
    assert resp.status_code == 202
    final = wait_for_status(client, resp.json()["request_id"], tenant.headers)
    assert final["status"] == "COMPLETED"
    time.sleep(1.1)  # past the store sample's cache
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("auraserve_jobs_finished_total", model=MODEL, status="COMPLETED") == 1
    assert grew("auraserve_credits_captured_total") > 0
    assert grew("auraserve_credits_released_total") == 0
    for name in ("queued", "running", "total"):
        assert grew(f"auraserve_job_{name}_seconds_count", model=MODEL) == 1
    # The tiny model runs on the CPU here: the worker metrics carry the device.
    assert grew("auraserve_worker_batch_size_count", model=MODEL, device="cpu") == 1
    assert grew("auraserve_worker_steps_per_second_count", model=MODEL, device="cpu") == 1
    # Requests are counted by route template, never by the raw path (one series per route).
    polls = "/v2/requests/status/{request_id}"
    assert grew("auraserve_http_requests_total", method="GET", route=polls, status="200") >= 1
    submits = "/{model_id}/v1/{name}-request"
    assert grew("auraserve_http_requests_total", method="POST", route=submits, status="202") == 1
    routes = {dict(k[1]).get("route", "") for k in after if k[0].startswith("auraserve_http")}
    # No label carries a request id (a route template never does; the sync dialect's
    # per-preset routes such as /v1/auraflow-v0-3-512 are templates too).
    raw = [r for r in routes if re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", r)]
    assert not raw, raw
    assert value(after, "auraserve_store_up") == 1
    assert value(after, "auraserve_queue_depth", model=MODEL) == 0
    assert value(after, "auraserve_workers_live") >= 1  # the in-process worker registered


def test_queue_depth_oldest_age_and_live_workers_come_from_the_store(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    for _ in range(2):
        assert client.post(SUBMIT, headers=tenant.headers, json=JOB_BODY).status_code == 202
    db = api_only_server.runtime.db
    for name in ("fresh", "stale"):
        registry.register(
            db, worker_id=name, host="h", pid=1, models=[MODEL], device="cpu", state="ready"
        )
    stale = api_only_server.runtime.settings.worker_stale_seconds + 1
    with db.write() as conn:
        conn.execute(
            update(workers)
            .where(workers.c.id == "stale")
            .values(last_seen_at=workers.c.last_seen_at - stale)
        )
    time.sleep(1.1)  # past the sample cache, and old enough to show an age
    samples = scrape(client)
    assert value(samples, "auraserve_queue_depth", model=MODEL) == 2
    assert value(samples, "auraserve_queue_oldest_age_seconds", model=MODEL) >= 1.0
    assert value(samples, "auraserve_jobs_processing", model=MODEL) == 0
    # Every configured preset has its series, at 0 when nothing is queued for it.
    assert ("auraserve_queue_depth", (("model", "auraflow-v0-3"),)) in samples
    assert value(samples, "auraserve_workers_live") == 1


def test_the_store_sample_is_cached_and_an_outage_reads_store_up_0() -> None:
    calls: list[float] = []
    now = [0.0]

    def sample() -> StoreSample:
        calls.append(now[0])
        if len(calls) > 1:
            raise OSError("connection refused")
        return StoreSample(models={MODEL: ModelQueue(queued=3)}, live_workers=2)

    collector = StoreCollector(sample, ttl=1.0, clock=lambda: now[0])
    names = {m.name: m for m in collector.collect()}
    assert names["auraserve_store_up"].samples[0].value == 1
    assert names["auraserve_queue_depth"].samples[0].value == 3
    now[0] = 0.5
    list(collector.collect())
    assert len(calls) == 1  # cached
    now[0] = 1.5
    names = {m.name: m for m in collector.collect()}
    assert len(calls) == 2
    assert set(names) == {"auraserve_store_up"}
    assert names["auraserve_store_up"].samples[0].value == 0


_CHILD = textwrap.dedent(
    """
    import sys
    from auraserve.observability import metrics
    metrics.JOBS_FINISHED.labels("m", "COMPLETED").inc(int(sys.argv[1]))
    metrics.HTTP_REQUESTS.labels("GET", "/healthz", "200").inc()
    if len(sys.argv) > 2:
        sys.stdout.buffer.write(metrics.exposition())
    """
)


def test_multiprocess_mode_aggregates_every_process(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", _CHILD, "2"], env=env, check=True)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, "3", "print"], env=env, check=True, capture_output=True
    ).stdout.decode()
    samples = parse(out)
    assert value(samples, "auraserve_jobs_finished_total", model="m", status="COMPLETED") == 5
    healthz = {"method": "GET", "route": "/healthz", "status": "200"}
    assert value(samples, "auraserve_http_requests_total", **healthz) == 2
