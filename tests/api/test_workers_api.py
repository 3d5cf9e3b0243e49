"""Scale-out from the API's side: the admin-only worker list, the note on a queued job that no
live worker will run, and status streams that end when the server shuts down."""

from __future__ import annotations

import threading
import time

import httpx

from auraserve.store import keys, workers
from auraserve.store.db import LIVE_MODELS_TTL
from tests.conftest import LiveServer, Tenant

SUBMIT = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"


def _admin_headers(server: LiveServer) -> dict[str, str]:
    created = keys.create_account(server.runtime.db, "ops", is_admin=True)
    return {"Authorization": f"Bearer {created.key}"}


def test_workers_are_listed_for_admin_keys_only(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    assert client.get("/v2/workers").status_code == 401
    refused = client.get("/v2/workers", headers=tenant.headers)
    assert refused.status_code == 403
    assert refused.json()["error"] == "Forbidden"
    assert "admin" in refused.json()["message"]

    admin = _admin_headers(server)
    deadline = time.monotonic() + 20
    while True:  # registered at once as "starting"; "ready" once its thread is up
        body = client.get("/v2/workers", headers=admin).json()
        (worker,) = body["workers"]
        if worker["state"] != "starting":
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    in_process = server.runtime.workers[0]
    assert worker["id"] == in_process.worker_id
    assert worker["liveness"] == "live" and worker["state"] in ("ready", "busy")
    assert worker["device"] == server.runtime.engine.description
    assert "auraflow-v0-3-512" in worker["models"] and "auraflow-v0-3-512" in body["live_models"]
    assert body["stale_after_seconds"] == server.runtime.settings.worker_stale_seconds


def test_a_queued_job_no_live_worker_serves_says_so(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    rid = client.post(SUBMIT, headers=tenant.headers, json={"prompt": "p"}).json()["request_id"]
    status = client.get(f"/v2/requests/status/{rid}", headers=tenant.headers).json()
    assert status["status"] == "QUEUED" and status["error"] is None
    assert "no live worker serves model auraflow-v0-3-512" in status["note"]

    # A worker for that model registers (on another machine, say): the note goes, within the
    # live-models cache's second.
    db = api_only_server.runtime.db
    workers.register(
        db, worker_id="far", host="gpu-9", pid=1, models=["auraflow-v0-3-512"], device="x"
    )
    deadline = time.monotonic() + LIVE_MODELS_TTL + 2
    while "note" in client.get(f"/v2/requests/status/{rid}", headers=tenant.headers).json():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # It stops: the note is back.
    workers.mark_stopped(db, "far", jobs_done=0)
    deadline = time.monotonic() + LIVE_MODELS_TTL + 2
    while "note" not in client.get(f"/v2/requests/status/{rid}", headers=tenant.headers).json():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_status_streams_end_when_the_server_begins_to_stop(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    rid = client.post(SUBMIT, headers=tenant.headers, json={"prompt": "p"}).json()["request_id"]
    lines: list[str] = []
    opened = threading.Event()

    def read() -> None:
        with client.stream(
            "GET", f"/v2/requests/status/{rid}/stream", headers=tenant.headers, timeout=30
        ) as resp:
            for line in resp.iter_lines():
                opened.set()
                lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert opened.wait(10)
    started = time.monotonic()
    api_only_server.runtime.begin_stop()  # what the first SIGTERM does
    reader.join(10)
    assert not reader.is_alive(), "the stream outlived the stop"
    assert time.monotonic() - started < 3.0
    assert any(line.startswith("data: ") for line in lines)
