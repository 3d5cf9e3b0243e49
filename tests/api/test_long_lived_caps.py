"""Per-account caps on open status streams and waiting sync requests: 429 with Retry-After in
the route's dialect beyond them, other accounts untouched, slots given back at the end."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from auraserve.config import Settings
from auraserve.runtime import Runtime
from auraserve.store import jobs
from tests.conftest import LiveServer, Tenant, make_tenant

SEED_PATH = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
CAP = 2
SYNC_TIMEOUT = 3.0


@pytest.fixture
def capped(settings: Settings) -> Iterator[LiveServer]:
    """An API-only server (jobs stay QUEUED, so streams and sync waits stay open)."""
    runtime = Runtime.open(
        settings.model_copy(
            update={
                "max_streams_per_account": CAP,
                "max_sync_waits_per_account": CAP,
                "sync_timeout_seconds": SYNC_TIMEOUT,
            }
        )
    )
    live = LiveServer(runtime).start()
    yield live
    live.stop()
    runtime.close()


@pytest.fixture
def http(capped: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=capped.url, timeout=30) as client:
        yield client


def _submit(http: httpx.Client, tenant: Tenant) -> str:
    resp = http.post(SEED_PATH, headers=tenant.headers, json={"prompt": "a"})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["request_id"])


def _open_stream(stack: ExitStack, http: httpx.Client, tenant: Tenant, rid: str) -> httpx.Response:
    resp = stack.enter_context(
        http.stream("GET", f"/v2/requests/status/{rid}/stream", headers=tenant.headers)
    )
    return resp


def test_streams_beyond_the_cap_get_429_in_the_queue_shape(
    capped: LiveServer, http: httpx.Client
) -> None:
    alice = make_tenant(capped.runtime, name="alice")
    bob = make_tenant(capped.runtime, name="bob")
    rid = _submit(http, alice)
    with ExitStack() as stack:
        first = [_open_stream(stack, http, alice, rid) for _ in range(CAP)]
        assert [r.status_code for r in first] == [200] * CAP
        refused = http.get(f"/v2/requests/status/{rid}/stream", headers=alice.headers)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "5"
        body = refused.json()
        assert body["error"] == "Too Many Requests"
        assert "AURASERVE_MAX_STREAMS_PER_ACCOUNT" in body["message"]
        # Another account, and the same account's other routes, are not affected.
        other = _open_stream(stack, http, bob, _submit(http, bob))
        assert other.status_code == 200
        assert http.get(f"/v2/requests/status/{rid}", headers=alice.headers).status_code == 200
        first[0].close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the closed stream and gives its slot back
            with http.stream(
                "GET", f"/v2/requests/status/{rid}/stream", headers=alice.headers
            ) as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the closed stream's slot was never given back"
            time.sleep(0.1)


def _wait_in_background(
    url: str, path: str, tenant: Tenant, body: dict[str, Any], out: list[int]
) -> threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            out.append(client.post(path, headers=tenant.headers, json=body).status_code)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _held(capped: LiveServer, account_id: str) -> int:
    from auraserve.api.limits import Kind
    from auraserve.api.state import state_of

    return int(state_of(capped.app).long_lived.held(Kind.SYNC_WAIT, account_id))


def test_sync_waits_beyond_the_cap_get_429_in_each_dialect(
    capped: LiveServer, http: httpx.Client
) -> None:
    alice = make_tenant(capped.runtime, name="alice")
    bob = make_tenant(capped.runtime, name="bob")
    statuses: list[int] = []
    waiting = [
        _wait_in_background(capped.url, "/v1/aura-flow", alice, {"prompt": "a"}, statuses),
        _wait_in_background(capped.url, "/v1/images/generations", alice, {"prompt": "a"}, statuses),
    ]
    deadline = time.monotonic() + 5
    while _held(capped, alice.account_id) < CAP:
        assert time.monotonic() < deadline, "the sync requests never started waiting"
        time.sleep(0.05)

    sync = http.post("/v1/aura-flow", headers=alice.headers, data={"prompt": "a"})
    assert sync.status_code == 429, sync.text
    assert sync.headers["retry-after"] == "5"
    assert "AURASERVE_MAX_SYNC_WAITS_PER_ACCOUNT" in sync.json()["message"]

    openai = http.post("/v1/images/generations", headers=alice.headers, json={"prompt": "a"})
    assert openai.status_code == 429, openai.text
    assert openai.headers["retry-after"] == "5"
    error = openai.json()["error"]
    assert "AURASERVE_MAX_SYNC_WAITS_PER_ACCOUNT" in error["message"]

    # Refused before anything was submitted or charged: only the two waiting requests' jobs
    # exist (a waiter holds its slot from before its submit commits, so allow it a moment).
    deadline = time.monotonic() + 5
    while jobs.count_active(capped.runtime.db, alice.account_id) < 2:
        assert time.monotonic() < deadline, "the waiting requests' jobs were never submitted"
        time.sleep(0.05)
    time.sleep(0.2)  # and no third one arrives
    assert jobs.count_active(capped.runtime.db, alice.account_id) == 2
    # Bob's waits are his own; an unknown OpenAI path still answers 404, key or not.
    bob_statuses: list[int] = []
    _wait_in_background(capped.url, "/v1/aura-flow", bob, {"prompt": "a"}, bob_statuses).join(30)
    assert bob_statuses == [504]
    assert http.post("/v1/images/nothing-here").status_code == 404

    for thread in waiting:
        thread.join(30)
    assert statuses == [504, 504]
    assert _held(capped, alice.account_id) == 0
