"""Live progress: queue position, step progress and timestamped logs in the status object, and
the same objects as a server-sent event stream."""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import httpx
import pytest

from auraserve.config import Settings
from tests.conftest import LiveServer, Tenant, make_tenant

SUBMIT = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"sse_keepalive_seconds": 0.3})


def _submit(client: httpx.Client, tenant: Tenant, **body: Any) -> str:
    resp = client.post(SUBMIT, headers=tenant.headers, json={"prompt": "p", **body})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["request_id"])


def _read_stream(
    client: httpx.Client,
    url: str,
    headers: dict[str, str],
    lines: list[str],
    *,
    timeout: float = 60,
) -> None:
    """Collect the stream's lines until the server ends it."""
    with client.stream("GET", url, headers=headers, timeout=timeout) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            lines.append(line)


def _events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]


def test_stream_shows_progress_and_logs_until_completed(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    request_id = _submit(client, tenant, num_inference_steps=12, guidance_scale=1.0)
    lines: list[str] = []
    _read_stream(client, f"/v2/requests/status/{request_id}/stream", tenant.headers, lines)
    events = _events(lines)
    assert events, lines
    statuses = [e["status"] for e in events]
    assert statuses[-1] == "COMPLETED", statuses
    assert statuses.count("COMPLETED") == 1
    # Statuses only move forward.
    order = {"QUEUED": 0, "PROCESSING": 1, "COMPLETED": 2}
    assert [order[s] for s in statuses] == sorted(order[s] for s in statuses)
    processing = [e for e in events if e["status"] == "PROCESSING"]
    assert processing, statuses
    steps = [e["progress"]["step"] for e in processing]
    assert steps == sorted(steps)
    last = processing[-1]
    assert set(last["progress"]) >= {"step", "total_steps", "percent"}
    assert last["progress"]["total_steps"] == 12
    assert 0 <= last["progress"]["percent"] <= 100
    assert last["logs"] and "started on" in last["logs"][0]["message"]
    import re

    assert re.fullmatch(ISO, last["logs"][0]["timestamp"])
    final = events[-1]
    assert final["progress"]["percent"] == 100.0 and final["output"]["media_url"]
    # The stream's objects are the status endpoint's objects.
    polled = client.get(f"/v2/requests/status/{request_id}", headers=tenant.headers).json()
    assert polled == final


def test_stream_keeps_alive_while_queued_and_ends_on_cancel(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    ahead = _submit(client, tenant)
    request_id = _submit(client, tenant)
    lines: list[str] = []
    reader = threading.Thread(
        target=_read_stream,
        args=(client, f"/v2/requests/status/{request_id}/stream", tenant.headers, lines),
    )
    reader.start()
    time.sleep(1.2)
    assert lines.count(": keep-alive") >= 2, lines
    first = _events(lines)[0]
    assert first["status"] == "QUEUED" and first["queue_position"] == 1
    # Cancelling the job ahead moves this one up; the stream notices at its next re-check.
    client.post(f"/v2/requests/{ahead}/cancel", headers=tenant.headers)
    time.sleep(1.6)
    assert _events(lines)[-1]["queue_position"] == 0
    client.post(f"/v2/requests/{request_id}/cancel", headers=tenant.headers)
    reader.join(10)
    assert not reader.is_alive(), "the stream did not end at the terminal status"
    assert _events(lines)[-1]["status"] == "CANCELLED"


def test_stream_is_tenant_scoped(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    request_id = _submit(client, tenant)
    other = make_tenant(api_only_server.runtime, name="other")
    url = f"/v2/requests/status/{request_id}/stream"
    assert client.get(url, headers=other.headers).status_code == 404
    assert client.get(url).status_code == 401
    assert client.get("/v2/requests/status/nope/stream", headers=tenant.headers).status_code == 404


def test_an_open_stream_ends_within_two_seconds_of_its_keys_revocation(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant, settings: Settings
) -> None:
    """Revoked elsewhere (the CLI: another Store, no shared cache), the key stops its
    open streams like every new request: a last `error` event, then the end."""
    from auraserve.store import keys
    from auraserve.store.db import Store

    request_id = _submit(client, tenant)  # no worker: it stays QUEUED
    cli = Store(settings.resolved_database_url)
    try:
        url = f"/v2/requests/status/{request_id}/stream"
        with client.stream("GET", url, headers=tenant.headers) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            assert keys.revoke_key(cli, tenant.key_id)
            revoked = time.monotonic()
            rest = list(lines)
            ended = time.monotonic() - revoked
    finally:
        cli.dispose()
    events = [line for line in rest if line.startswith(("event:", "data:"))]
    assert events[-2:-1] == ["event: error"], rest
    assert json.loads(events[-1].removeprefix("data: "))["error"] == "Unauthorized"
    assert ended < 2.0 + 1.0, ended  # the promise, plus one wake-up of the stream


def _previews(lines: list[str]) -> list[dict[str, Any]]:
    """The `event: preview` events' bodies, in order."""
    found = []
    for kind, data in itertools.pairwise(lines):
        if kind == "event: preview":
            assert data.startswith("data: "), data
            found.append(json.loads(data[len("data: ") :]))
    return found


def _previews_posted() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("auraserve_worker_previews_total") or 0.0


def test_a_stream_that_asks_for_previews_sees_the_images_form(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    import base64
    import io

    from PIL import Image

    steps = 24
    before = _previews_posted()
    request_id = _submit(client, tenant, num_inference_steps=steps, num_images=2)
    lines: list[str] = []
    url = f"/v2/requests/status/{request_id}/stream?previews=true"
    _read_stream(client, url, tenant.headers, lines)
    previews = _previews(lines)
    assert previews, lines[:20]
    assert _previews_posted() > before
    seen = [p["step"] for p in previews]
    assert seen == sorted(set(seen)) and all(0 < s < steps for s in seen), seen
    assert all(s % 2 == 0 for s in seen)  # every AURASERVE_PREVIEW_EVERY_STEPS (2) steps
    for preview in previews:
        assert preview["total_steps"] == steps and len(preview["images"]) == 2
        for url_ in preview["images"]:
            prefix = "data:image/jpeg;base64,"
            assert url_.startswith(prefix)
            image = Image.open(io.BytesIO(base64.b64decode(url_[len(prefix) :])))
            assert image.format == "JPEG" and max(image.size) <= 256
    # The status events are still only status objects, ending COMPLETED.
    statuses = [e["status"] for e in _events(lines) if "status" in e]
    assert statuses[-1] == "COMPLETED" and len(statuses) == len(_events(lines)) - len(previews)


def test_nobody_watching_no_previews_are_made(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    before = _previews_posted()
    request_id = _submit(client, tenant, num_inference_steps=16)
    lines: list[str] = []
    # A plain stream (no previews asked for) and polls: the worker makes none.
    _read_stream(client, f"/v2/requests/status/{request_id}/stream", tenant.headers, lines)
    assert _events(lines)[-1]["status"] == "COMPLETED"
    assert _previews(lines) == []
    assert _previews_posted() == before
