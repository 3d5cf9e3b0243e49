"""Cancelling requests: queued ones at once, running ones at the worker's next step."""

from __future__ import annotations

import time

import httpx
import pytest

from auraserve.store import ledger
from tests.conftest import LiveServer, Tenant, make_tenant, wait_for_status

SUBMIT = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"


def _submit(client: httpx.Client, tenant: Tenant, **body: object) -> str:
    resp = client.post(SUBMIT, headers=tenant.headers, json={"prompt": "p", **body})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["request_id"])


def _kinds(db: object, account_id: str) -> list[str]:
    return [str(e["kind"]) for e in ledger.entries(db, account_id)]  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_queued_job_is_cancelled_at_once_and_refunded(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant, method: str
) -> None:
    db = api_only_server.runtime.db
    before = ledger.balance(db, tenant.account_id)
    request_id = _submit(client, tenant, num_inference_steps=10)
    assert ledger.balance(db, tenant.account_id) < before
    resp = client.request(method, f"/v2/requests/{request_id}/cancel", headers=tenant.headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "CANCELLED" and body["request_id"] == request_id
    assert body["completed_at"] is not None
    assert ledger.balance(db, tenant.account_id) == before
    assert _kinds(db, tenant.account_id)[-2:] == ["reserve", "release"]
    polled = client.get(f"/v2/requests/status/{request_id}", headers=tenant.headers).json()
    assert polled["status"] == "CANCELLED"
    # A second cancel finds it finished: 409 with its status, nothing refunded twice.
    again = client.post(f"/v2/requests/{request_id}/cancel", headers=tenant.headers)
    assert again.status_code == 409
    assert again.json()["status"] == "CANCELLED"
    assert ledger.balance(db, tenant.account_id) == before


def test_running_job_stops_at_its_next_step(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    db = server.runtime.db
    before = ledger.balance(db, tenant.account_id)
    request_id = _submit(client, tenant, num_inference_steps=100, guidance_scale=1.0)
    deadline = time.monotonic() + 60
    while True:
        status = client.get(f"/v2/requests/status/{request_id}", headers=tenant.headers).json()
        if status["status"] == "PROCESSING" and status["progress"]["step"] >= 1:
            break
        assert status["status"] in ("QUEUED", "PROCESSING"), status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    resp = client.post(f"/v2/requests/{request_id}/cancel", headers=tenant.headers)
    assert resp.status_code == 202, resp.text
    assert resp.json()["cancel_requested"] is True
    asked = time.monotonic()
    final = wait_for_status(client, request_id, tenant.headers, timeout=30)
    assert final["status"] == "CANCELLED", final
    assert time.monotonic() - asked < 10
    assert final["progress"]["step"] < 100
    assert final["output"] is None
    assert ledger.balance(db, tenant.account_id) == before
    assert _kinds(db, tenant.account_id)[-2:] == ["reserve", "release"]


def test_finished_job_is_409_and_other_accounts_404(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    request_id = _submit(client, tenant, num_inference_steps=1, width=512, height=512)
    assert wait_for_status(client, request_id, tenant.headers)["status"] == "COMPLETED"
    resp = client.post(f"/v2/requests/{request_id}/cancel", headers=tenant.headers)
    assert resp.status_code == 409
    assert resp.json()["status"] == "COMPLETED" and resp.json()["error"] == "Conflict"
    other = make_tenant(server.runtime, name="other")
    assert (
        client.post(f"/v2/requests/{request_id}/cancel", headers=other.headers).status_code == 404
    )
    assert client.post("/v2/requests/not-an-id/cancel", headers=tenant.headers).status_code == 404
    assert client.post(f"/v2/requests/{request_id}/cancel").status_code == 401
    assert (
        client.get(f"/v2/requests/{request_id}/cancel", headers=tenant.headers).status_code == 405
    )
