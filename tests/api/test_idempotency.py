"""Idempotency-Key on submits of all three dialects: one job, one charge, the first response."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from auraserve.config import Settings
from auraserve.store import ledger
from auraserve.store.schema import jobs as jobs_table
from tests.conftest import LiveServer, Tenant

SUBMIT = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"sync_timeout_seconds": 60.0})


def _job_count(server: LiveServer) -> int:
    with server.runtime.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs_table)).scalar_one())


def _reserves(server: LiveServer, tenant: Tenant) -> int:
    return sum(
        1 for e in ledger.entries(server.runtime.db, tenant.account_id) if e["kind"] == "reserve"
    )


def test_queue_replay_same_key_same_body(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    key = str(uuid.uuid4())
    headers = {**tenant.headers, "Idempotency-Key": key}
    body = {"prompt": "same", "num_inference_steps": 3}
    first = client.post(SUBMIT, headers=headers, json=body)
    assert first.status_code == 202
    balance = ledger.balance(api_only_server.runtime.db, tenant.account_id)
    second = client.post(SUBMIT, headers=headers, json=body)
    assert second.status_code == 202
    assert second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert second.headers["x-remaining-credits"] == str(balance)
    assert ledger.balance(api_only_server.runtime.db, tenant.account_id) == balance
    assert _job_count(api_only_server) == 1 and _reserves(api_only_server, tenant) == 1
    # Same key, different body: refused, nothing made.
    changed = client.post(SUBMIT, headers=headers, json={**body, "num_inference_steps": 4})
    assert changed.status_code == 422
    assert changed.json()["field"] == "Idempotency-Key"
    assert _job_count(api_only_server) == 1
    # Same key with another webhook is another request too.
    hooked = client.post(
        SUBMIT, headers={**headers, "X-Webhook-URL": "https://hooks.example.com/x"}, json=body
    )
    assert hooked.status_code == 422
    # A new key is a new request.
    other = client.post(SUBMIT, headers={**tenant.headers, "Idempotency-Key": "k-2"}, json=body)
    assert other.status_code == 202 and other.json()["request_id"] != first.json()["request_id"]
    # Keys are per account: another account may use the same key.
    assert _job_count(api_only_server) == 2


def test_bad_key_is_400(api_only_server: LiveServer, client: httpx.Client, tenant: Tenant) -> None:
    for bad in ("", "has space", "x" * 256):
        resp = client.post(
            SUBMIT, headers={**tenant.headers, "Idempotency-Key": bad}, json={"prompt": "p"}
        )
        assert resp.status_code == 400, bad
        assert resp.json()["field"] == "Idempotency-Key"
    sync = client.post(
        "/v1/aura-flow",
        headers={"x-api-key": tenant.key, "Idempotency-Key": "a b"},
        data={"prompt": "p"},
    )
    assert sync.status_code == 400 and "x-remaining-credits" in sync.headers


def test_concurrent_duplicates_make_one_job(api_only_server: LiveServer, tenant: Tenant) -> None:
    """Threads race the same key at the live server; exactly one job and one charge."""
    key = str(uuid.uuid4())
    headers = {**tenant.headers, "Idempotency-Key": key}
    body = {"prompt": "race", "num_inference_steps": 5}
    before = ledger.balance(api_only_server.runtime.db, tenant.account_id)
    barrier = threading.Barrier(8)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def hit() -> None:
        with httpx.Client(base_url=api_only_server.url, timeout=30) as c:
            barrier.wait()
            resp = c.post(SUBMIT, headers=headers, json=body)
        with lock:
            results.append(resp)

    threads = [threading.Thread(target=hit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [202] * 8, [r.text for r in results]
    assert len({r.json()["request_id"] for r in results}) == 1
    assert sum(1 for r in results if r.headers.get("idempotent-replayed")) == 7
    assert _job_count(api_only_server) == 1 and _reserves(api_only_server, tenant) == 1
    price = before - ledger.balance(api_only_server.runtime.db, tenant.account_id)
    assert price > 0
    assert all(r.headers["x-remaining-credits"] == str(before - price) for r in results)


def test_key_expires_after_ttl(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    runtime = api_only_server.runtime
    runtime.settings = runtime.settings.model_copy(update={"idempotency_ttl_seconds": 0.5})
    headers = {**tenant.headers, "Idempotency-Key": "short-lived"}
    first = client.post(SUBMIT, headers=headers, json={"prompt": "p"}).json()["request_id"]
    assert client.post(SUBMIT, headers=headers, json={"prompt": "p"}).json()["request_id"] == first
    time.sleep(0.7)
    # Expired: the same key now makes a new request, even with another body.
    later = client.post(SUBMIT, headers=headers, json={"prompt": "q"})
    assert later.status_code == 202 and later.json()["request_id"] != first


def test_sync_replay_returns_the_same_image(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    headers = {"x-api-key": tenant.key, "Idempotency-Key": "sync-1"}
    form = {"prompt": "a kite", "steps": "1", "width": "512", "height": "512", "sampler": "euler"}
    first = client.post("/v1/aura-flow", headers=headers, data=form)
    assert first.status_code == 200, first.text
    balance = ledger.balance(server.runtime.db, tenant.account_id)
    second = client.post("/v1/aura-flow", headers=headers, data=form)
    assert second.status_code == 200
    assert second.content == first.content
    assert second.headers["x-request-id"] == first.headers["x-request-id"]
    assert second.headers["x-seed"] == first.headers["x-seed"]  # the random seed is not redrawn
    assert ledger.balance(server.runtime.db, tenant.account_id) == balance
    assert _job_count(server) == 1
    changed = client.post("/v1/aura-flow", headers=headers, data={**form, "steps": "2"})
    assert changed.status_code == 422 and changed.json()["field"] == "Idempotency-Key"


def test_openai_replay(api_only_server: LiveServer, tenant: Tenant) -> None:
    """Both calls time out on the same job (no worker runs): the retry did not make another."""
    runtime = api_only_server.runtime
    runtime.settings = runtime.settings.model_copy(update={"sync_timeout_seconds": 0.2})
    headers = {"Authorization": f"Bearer {tenant.key}", "Idempotency-Key": "oa-1"}
    url = api_only_server.url + "/v1/images/generations"
    body: dict[str, Any] = {"prompt": "a", "size": "512x512"}
    first = httpx.post(url, headers=headers, json=body)
    second = httpx.post(url, headers=headers, json=body)
    assert first.status_code == second.status_code == 504
    assert first.headers["x-request-id"] == second.headers["x-request-id"]
    assert _job_count(api_only_server) == 1 and _reserves(api_only_server, tenant) == 1
    changed = httpx.post(url, headers=headers, json={**body, "n": 2})
    assert changed.status_code == 422
    assert changed.json()["error"]["param"] == "Idempotency-Key"
