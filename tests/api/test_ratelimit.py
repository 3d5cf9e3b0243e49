"""Per-account rate limits: requests per minute (memory and Redis) and jobs in flight."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import update

from auraserve.api.state import state_of
from auraserve.config import Settings
from auraserve.runtime import Runtime
from auraserve.store.schema import accounts
from tests.conftest import LiveServer, Tenant, free_port, make_tenant

SUBMIT = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
REDIS_URL = "redis://127.0.0.1:6379/0"


def _set_account(runtime: Any, account_id: str, **values: int | None) -> None:
    with runtime.db.write() as conn:
        conn.execute(update(accounts).where(accounts.c.id == account_id).values(**values))


def _submit(client: httpx.Client, tenant: Tenant, url: str = SUBMIT) -> httpx.Response:
    return client.post(url, headers=tenant.headers, json={"prompt": "p"})


def _assert_429(resp: httpx.Response, limit: int) -> None:
    assert resp.status_code == 429, resp.text
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.headers["ratelimit-limit"] == str(limit)
    assert resp.headers["ratelimit-remaining"] == "0"
    assert int(resp.headers["ratelimit-reset"]) >= 1
    assert resp.json()["error"] == "Too Many Requests"


def test_account_requests_per_minute(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    _set_account(api_only_server.runtime, tenant.account_id, requests_per_minute=3)
    remaining = []
    for _ in range(3):
        resp = _submit(client, tenant)
        assert resp.status_code == 202
        assert resp.headers["ratelimit-limit"] == "3"
        remaining.append(int(resp.headers["ratelimit-remaining"]))
    assert remaining == [2, 1, 0]
    _assert_429(_submit(client, tenant), 3)
    # Every dialect draws on the same budget, and speaks its own error shape.
    sync = client.post("/v1/aura-flow", headers={"x-api-key": tenant.key}, data={"prompt": "p"})
    _assert_429(sync, 3)
    oa = client.post(
        "/v1/images/generations",
        headers={"Authorization": f"Bearer {tenant.key}"},
        json={"prompt": "p"},
    )
    assert oa.status_code == 429 and oa.json()["error"]["type"] == "rate_limit_error"
    # Other accounts are unaffected (server default: 600/min).
    other = make_tenant(api_only_server.runtime, name="other")
    resp = _submit(client, other)
    assert resp.status_code == 202 and resp.headers["ratelimit-limit"] == "600"


def test_account_max_concurrent(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    _set_account(api_only_server.runtime, tenant.account_id, max_concurrent=2)
    first = _submit(client, tenant)
    assert first.status_code == 202
    assert _submit(client, tenant).status_code == 202
    _assert_429(_submit(client, tenant), 2)
    # A finished job frees its slot.
    cancel = client.post(
        f"/v2/requests/{first.json()['request_id']}/cancel", headers=tenant.headers
    )
    assert cancel.status_code == 200
    assert _submit(client, tenant).status_code == 202


def test_server_defaults(settings: Settings, runtime: Runtime, tenant: Tenant) -> None:
    runtime.settings = settings.model_copy(
        update={"rate_limit_per_minute": 2, "rate_limit_max_concurrent": 1}
    )
    server = LiveServer(runtime).start()
    try:
        with httpx.Client(base_url=server.url) as c:
            first = _submit(c, tenant)
            assert first.status_code == 202
            _assert_429(_submit(c, tenant), 1)  # one job in flight at most
            rid = first.json()["request_id"]
            assert c.post(f"/v2/requests/{rid}/cancel", headers=tenant.headers).status_code == 200
            _assert_429(_submit(c, tenant), 2)  # the minute's budget is spent
    finally:
        server.stop()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"auraserve-test-{secrets.token_hex(4)}"
    yield prefix
    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(f"{prefix}*"):
        r.delete(key)
    r.close()


def test_redis_budget_is_shared_by_replicas(
    settings: Settings, runtime: Runtime, tenant: Tenant, redis_prefix: str
) -> None:
    """Two API replicas on one store and one Redis: the account's budget is one budget."""
    shared = settings.model_copy(
        update={"redis_url": REDIS_URL, "rate_limit_key_prefix": redis_prefix}
    )
    runtime.settings = shared
    other = Runtime.open(shared.model_copy(update={"port": free_port()}))
    _set_account(runtime, tenant.account_id, requests_per_minute=3)
    a = LiveServer(runtime).start()
    b = LiveServer(other).start()
    try:
        with httpx.Client(base_url=a.url) as ca, httpx.Client(base_url=b.url) as cb:
            assert _submit(ca, tenant).headers["ratelimit-remaining"] == "2"
            assert _submit(cb, tenant).headers["ratelimit-remaining"] == "1"
            assert _submit(ca, tenant).status_code == 202
            _assert_429(_submit(cb, tenant), 3)
            _assert_429(_submit(ca, tenant), 3)
        limiter = state_of(a.app).limiter
        assert limiter is not None and limiter.backend == "redis"
        keys = list(redis.Redis.from_url(REDIS_URL).scan_iter(f"{redis_prefix}*"))
        assert keys, "the limiter did not use Redis"
    finally:
        a.stop()
        b.stop()
        other.close()


def test_redis_down_fails_open(settings: Settings, runtime: Runtime, tenant: Tenant) -> None:
    runtime.settings = settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    )
    _set_account(runtime, tenant.account_id, requests_per_minute=1)
    server = LiveServer(runtime).start()
    try:
        with httpx.Client(base_url=server.url) as c:
            for _ in range(3):
                resp = _submit(c, tenant)
                assert resp.status_code == 202
                assert "ratelimit-limit" not in resp.headers
    finally:
        server.stop()
