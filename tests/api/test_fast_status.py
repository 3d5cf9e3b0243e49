"""The status poll's fast path (api/fast_status.py) answers exactly what the FastAPI route
answers, and leaves everything unusual to the route."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from auraserve.api.auth import current_account
from auraserve.core.jobs import JobStatus
from auraserve.errors import Unauthorized
from auraserve.store import jobs
from tests.conftest import LiveServer, Tenant, make_tenant, wait_for_status

SUBMIT = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
STATUS = "/v2/requests/status/"
# Headers that differ between any two responses.
_PER_RESPONSE = {"date", "x-request-id"}


def _submit(client: httpx.Client, tenant: Tenant, **headers: str) -> str:
    resp = client.post(
        SUBMIT,
        headers={**tenant.headers, **headers},
        json={"prompt": "p", "num_inference_steps": 2, "guidance_scale": 1.0},
    )
    assert resp.status_code == 202, resp.text
    return str(resp.json()["request_id"])


def _comparable(resp: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in resp.headers.items() if k not in _PER_RESPONSE}
    return resp.status_code, headers, resp.content


def _both(client: httpx.Client, path: str, headers: dict[str, str]) -> tuple[Any, Any]:
    """The same poll through the fast path and through the route (a query string, which the
    route ignores, sends it there)."""
    fast = client.get(path, headers=headers)
    routed = client.get(path + "?via=route", headers=headers)
    return _comparable(fast), _comparable(routed)


def _job_id(request_id: str) -> str:
    return request_id.rsplit("_", 1)[1]


def _route_refuses_keys(server: LiveServer) -> None:
    """From now on the FastAPI route refuses every key: whatever still succeeds was answered by
    the fast path, which never asks the route's dependencies."""

    async def refuse() -> None:
        raise Unauthorized("route reached")

    server.app.dependency_overrides[current_account] = refuse


def test_the_fast_path_answers_as_the_route_in_every_state(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    db = api_only_server.runtime.db
    queued = [_submit(client, tenant) for _ in range(3)]
    processing, failed = queued[0], queued[1]
    claimed = jobs.claim(
        db, worker_id="w1", models=["auraflow-v0-3-512"], max_images=1, lease_seconds=60
    )
    assert [j.id for j in claimed] == [_job_id(processing)]
    jobs.report_progress(
        db, worker_id="w1", job_ids=[_job_id(processing)], step=1, total=2, lease_seconds=60
    )
    assert jobs.claim(
        db, worker_id="w1", models=["auraflow-v0-3-512"], max_images=1, lease_seconds=60
    )
    jobs.finish_unsuccessful(
        db, worker_id="w1", job_id=_job_id(failed), status=JobStatus.FAILED, error="nope"
    )
    cancelled = _submit(client, tenant)
    assert client.post(f"/v2/requests/{cancelled}/cancel", headers=tenant.headers).is_success
    seen = set()
    for request_id in [*queued, cancelled]:
        fast, routed = _both(client, STATUS + request_id, tenant.headers)
        assert fast == routed
        seen.add(httpx.Response(200, content=fast[2]).json()["status"])
    assert seen == {"QUEUED", "PROCESSING", "FAILED", "CANCELLED"}


def test_a_completed_job_with_its_image_urls_is_answered_alike(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    request_id = _submit(client, tenant)
    assert wait_for_status(client, request_id, tenant.headers)["status"] == "COMPLETED"
    fast, routed = _both(client, STATUS + request_id, tenant.headers)
    assert fast == routed
    assert httpx.Response(200, content=fast[2]).json()["output"]


def test_the_fast_path_answers_without_the_route(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    # The key was verified (and cached) by the submit; the poll never reaches the route.
    request_id = _submit(client, tenant)
    _route_refuses_keys(api_only_server)
    assert client.get(STATUS + request_id, headers=tenant.headers).status_code == 200
    routed = client.get(STATUS + request_id + "?via=route", headers=tenant.headers)
    assert routed.status_code == 401 and "route reached" in routed.text
    # Counted under the route's template, like the route's own answers.
    metrics = client.get("/metrics").text
    counted = 'method="GET",route="/v2/requests/status/{request_id}",status="200"'
    assert counted in metrics, "\n".join(
        m for m in metrics.splitlines() if "http_requests_total" in m
    )


@pytest.mark.parametrize(
    "case", ["no key", "unknown key", "unknown id", "another account's id", "webhook job"]
)
def test_anything_unusual_goes_to_the_route(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant, case: str
) -> None:
    """With the route refusing every key, its 401 "route reached" shows the route answered."""
    request_id = _submit(client, tenant)
    headers = dict(tenant.headers)
    if case == "no key":
        headers = {}
    elif case == "unknown key":
        headers = {"Ocp-Apim-Subscription-Key": tenant.key[:-4] + "AAAA"}
    elif case == "unknown id":
        request_id = request_id[:-4] + "0000"
    elif case == "another account's id":
        other = make_tenant(api_only_server.runtime, name="other")
        _submit(client, other)  # its key is cached, like any polling client's
        headers = other.headers
    elif case == "webhook job":
        request_id = _submit(client, tenant, **{"X-Webhook-URL": "https://example.com/hook"})
    _route_refuses_keys(api_only_server)
    resp = client.get(STATUS + request_id, headers=headers)
    assert resp.status_code == 401 and "route reached" in resp.text, resp.text
