"""The webhook outbox end to end: a live server, its dispatcher and real HTTPS receivers on
loopback with a trustme CA (trusted through SSL_CERT_FILE), signatures checked with the
reference `standardwebhooks` library."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import uvicorn
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from auraserve.config import ConfigError, Settings, load_settings
from auraserve.core.jobs import JobStatus
from auraserve.core.request import build_request
from auraserve.core.status import status_body
from auraserve.runtime import Runtime
from auraserve.store import jobs, keys, ledger
from auraserve.store.schema import jobs as jobs_table
from auraserve.store.schema import webhook_deliveries
from tests.conftest import LiveServer, Tenant, free_port, wait_for_status
from tests.store_jobs import submit_one
from tests.webhooks.conftest import Receiver, Recorded

SUBMIT = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
FAST_SCHEDULE = [0.0] + [0.3] * 30  # retries every 0.3 s, long enough to outlast a restart


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "webhook_allow_hosts": ["127.0.0.1", "localhost", "::1"],
            "webhook_schedule": FAST_SCHEDULE,
            "webhook_sync_interval_seconds": 0.3,
            "webhook_timeout_seconds": 5.0,
        }
    )


@pytest.fixture(autouse=True)
def trust_test_ca(ca_pem_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem_file))


@pytest.fixture
def hooks(receiver: Receiver, tenant: Tenant) -> Iterator[Receiver]:
    """The shared HTTPS receiver, verifying with this tenant's secret for this test."""
    saved = receiver.secret
    receiver.secret = tenant.webhook_secret
    yield receiver
    receiver.secret = saved


def _submit(
    client: httpx.Client,
    tenant: Tenant,
    url: str,
    mode: str | None = None,
    previews: bool = False,
    **body: Any,
) -> str:
    headers = {**tenant.headers, "X-Webhook-URL": url}
    if mode:
        headers["X-Webhook-Mode"] = mode
    if previews:
        headers["X-Webhook-Previews"] = "true"
    resp = client.post(SUBMIT, headers=headers, json={"prompt": "p", **body})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["request_id"])


def _wait(predicate: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _deliveries(runtime: Any, job_id: str) -> list[Any]:
    with runtime.db.read() as conn:
        return conn.execute(
            select(webhook_deliveries)
            .where(webhook_deliveries.c.job_id == job_id)
            .order_by(webhook_deliveries.c.id)
        ).all()


def _job_id(request_id: str) -> str:
    return request_id.rsplit("_", 1)[1]


def _verify(secret: str, recorded: Recorded) -> dict[str, Any]:
    """Verify with the reference library, independently of the receiver's own check."""
    payload = Webhook(secret).verify(recorded.body, recorded.headers)
    assert isinstance(payload, dict)
    return payload


def test_terminal_webhook_is_signed_and_is_the_status_object(
    server: LiveServer, client: httpx.Client, tenant: Tenant, hooks: Receiver
) -> None:
    url = f"https://127.0.0.1:{hooks.port}/hook"
    request_id = _submit(client, tenant, url, num_inference_steps=2, guidance_scale=1.0)
    assert wait_for_status(client, request_id, tenant.headers)["status"] == "COMPLETED"
    _wait(lambda: len(hooks.requests) >= 1, what="the callback")
    time.sleep(0.5)  # terminal mode: nothing else may follow
    assert len(hooks.requests) == 1
    got = hooks.requests[0]
    assert got.verified and got.path == "/hook"
    payload = _verify(tenant.webhook_secret, got)
    assert got.headers["content-type"] == "application/json"
    assert payload["request_id"] == request_id and payload["status"] == "COMPLETED"
    _wait(
        lambda: _deliveries(server.runtime, _job_id(request_id))[0].state == "delivered",
        what="the delivery to be recorded",
    )
    status = client.get(f"/v2/requests/status/{request_id}", headers=tenant.headers).json()
    section = status.pop("webhook")
    assert payload == status  # the callback is the status object
    assert section["url"] == url and section["mode"] == "terminal"
    [delivery] = section["deliveries"]
    assert delivery["event_id"] == got.headers["webhook-id"]
    assert (delivery["state"], delivery["attempts"], delivery["last_status_code"]) == (
        "delivered",
        1,
        200,
    )
    assert delivery["status"] == "COMPLETED" and delivery["terminal"] is True


def test_rotation_signs_with_old_and_new_secret_during_the_grace_period(
    server: LiveServer, client: httpx.Client, tenant: Tenant, hooks: Receiver
) -> None:
    old = tenant.webhook_secret
    rotation = keys.rotate_webhook_secret(server.runtime.db, tenant.account_id, grace_seconds=60)
    assert rotation.previous_secret == old and rotation.secret != old
    url = f"https://127.0.0.1:{hooks.port}/hook"
    # Receivers not yet updated (the old secret) and updated ones (the new) both accept.
    for receiver_secret in (old, rotation.secret):
        hooks.secret = receiver_secret
        hooks.requests.clear()
        request_id = _submit(client, tenant, url, num_inference_steps=2, guidance_scale=1.0)
        assert wait_for_status(client, request_id, tenant.headers)["status"] == "COMPLETED"
        _wait(lambda: len(hooks.requests) >= 1, what="the callback")
        got = hooks.requests[0]
        assert got.verified
        assert len(got.headers["webhook-signature"].split()) == 2
        assert _verify(old, got)["request_id"] == request_id
        assert _verify(rotation.secret, got)["request_id"] == request_id
        _wait(
            lambda rid=request_id: (
                _deliveries(server.runtime, _job_id(rid))[0].state == "delivered"
            ),
            what="the delivery to be recorded",
        )
    # After the grace period only the new secret signs.
    ended = keys.rotate_webhook_secret(server.runtime.db, tenant.account_id, grace_seconds=0)
    hooks.secret = ended.secret
    hooks.requests.clear()
    request_id = _submit(client, tenant, url, num_inference_steps=2, guidance_scale=1.0)
    assert wait_for_status(client, request_id, tenant.headers)["status"] == "COMPLETED"
    _wait(lambda: len(hooks.requests) >= 1, what="the callback")
    got = hooks.requests[0]
    assert got.verified and len(got.headers["webhook-signature"].split()) == 1
    with pytest.raises(WebhookVerificationError):
        _verify(rotation.secret, got)


def test_sync_mode_sends_throttled_progress_then_final(
    server: LiveServer, client: httpx.Client, tenant: Tenant, hooks: Receiver
) -> None:
    url = f"https://127.0.0.1:{hooks.port}/hook"
    # 100 steps at 1024² take well over the 0.3 s progress interval even on a fast machine
    # (40 steps at 512² did not, and then no PROCESSING callback is due).
    request_id = _submit(
        client,
        tenant,
        url,
        mode="sync",
        num_inference_steps=100,
        guidance_scale=1.0,
        width=1024,
        height=1024,
    )
    assert wait_for_status(client, request_id, tenant.headers, timeout=120)["status"] == "COMPLETED"
    _wait(
        lambda: any(json.loads(r.body)["status"] == "COMPLETED" for r in hooks.requests),
        what="the final callback",
    )
    payloads = [_verify(tenant.webhook_secret, r) for r in hooks.requests]
    statuses = [p["status"] for p in payloads]
    assert statuses[0] == "QUEUED"
    assert "PROCESSING" in statuses, statuses
    assert statuses.count("COMPLETED") == 1
    progress = [p for p in payloads if p["status"] == "PROCESSING"]
    assert all(p["progress"]["total_steps"] == 100 for p in progress)
    # At most one progress callback per interval (0.3 s here; seed 002's is 15 s).
    rows = _deliveries(server.runtime, _job_id(request_id))
    created = [r.created_at for r in rows if not r.terminal]
    gaps = [b - a for a, b in itertools.pairwise(created)]
    assert all(g >= 0.3 * 0.99 for g in gaps), gaps
    assert len({r.headers["webhook-id"] for r in hooks.requests}) == len(hooks.requests)


def test_progress_callbacks_carry_previews_when_asked(
    server: LiveServer, client: httpx.Client, tenant: Tenant, hooks: Receiver
) -> None:
    """`X-Webhook-Previews: true` with sync mode: the job counts as watched while it runs, so
    its worker makes previews, and each progress callback carries the newest one."""
    import base64
    import io

    from PIL import Image

    url = f"https://127.0.0.1:{hooks.port}/hook"
    # As for the plain sync test: long enough for progress callbacks at the 0.3 s interval.
    request_id = _submit(
        client,
        tenant,
        url,
        mode="sync",
        previews=True,
        num_inference_steps=100,
        guidance_scale=1.0,
        width=1024,
        height=1024,
    )
    status = wait_for_status(client, request_id, tenant.headers, timeout=120)
    assert status["status"] == "COMPLETED"
    assert status["webhook"]["mode"] == "sync" and status["webhook"]["previews"] is True
    _wait(
        lambda: any(json.loads(r.body)["status"] == "COMPLETED" for r in hooks.requests),
        what="the final callback",
    )
    payloads = [_verify(tenant.webhook_secret, r) for r in hooks.requests]
    with_preview = [p for p in payloads if "preview" in p]
    assert with_preview, [p["status"] for p in payloads]
    assert all(p["status"] == "PROCESSING" for p in with_preview)  # never on the final one
    for payload in with_preview:
        preview = payload["preview"]
        assert 0 < preview["step"] <= payload["progress"]["step"] + 2
        assert len(preview["images"]) == 1
        data = preview["images"][0].removeprefix("data:image/jpeg;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(data))).format == "JPEG"


def test_previews_header_values(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant, hooks: Receiver
) -> None:
    url = f"https://127.0.0.1:{hooks.port}/hook"
    headers = {**tenant.headers, "X-Webhook-URL": url, "X-Webhook-Previews": "maybe"}
    resp = client.post(SUBMIT, headers={**headers, "X-Webhook-Mode": "sync"}, json={"prompt": "p"})
    assert resp.status_code == 400 and resp.json()["field"] == "X-Webhook-Previews", resp.text
    assert "true or false" in resp.json()["message"]
    # Terminal mode sends no progress callbacks: previews have nothing to ride on, no error.
    headers["X-Webhook-Previews"] = "true"
    resp = client.post(SUBMIT, headers=headers, json={"prompt": "p"})
    assert resp.status_code == 202, resp.text
    status = client.get(f"/v2/requests/status/{resp.json()['request_id']}", headers=tenant.headers)
    assert status.json()["webhook"]["mode"] == "terminal"
    assert status.json()["webhook"].get("previews") is None


def test_cancel_fires_the_terminal_webhook(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant, hooks: Receiver
) -> None:
    request_id = _submit(client, tenant, f"https://localhost:{hooks.port}/hook")
    resp = client.post(f"/v2/requests/{request_id}/cancel", headers=tenant.headers)
    assert resp.status_code == 200
    _wait(lambda: len(hooks.requests) == 1, what="the CANCELLED callback")
    payload = _verify(tenant.webhook_secret, hooks.requests[0])
    assert payload["status"] == "CANCELLED" and payload["request_id"] == request_id


def test_a_jobs_callbacks_arrive_in_the_order_recorded(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant, hooks: Receiver
) -> None:
    # The receiver holds the QUEUED callback for 5 s; the CANCELLED one, recorded meanwhile,
    # must wait for it rather than overtake it on a second connection.
    request_id = _submit(client, tenant, f"https://localhost:{hooks.port}/slow", mode="sync")
    _wait(lambda: len(hooks.requests) == 1, what="the QUEUED callback")
    assert client.post(f"/v2/requests/{request_id}/cancel", headers=tenant.headers).is_success
    _wait(
        lambda: len(_deliveries(api_only_server.runtime, _job_id(request_id))) == 2,
        what="the CANCELLED delivery row",
    )
    time.sleep(1.0)  # time enough for a concurrent send to arrive
    assert len(hooks.requests) == 1
    _wait(lambda: len(hooks.requests) == 2, what="the CANCELLED callback")
    statuses = [json.loads(r.body)["status"] for r in hooks.requests]
    assert statuses == ["QUEUED", "CANCELLED"]


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"X-Webhook-URL": "http://127.0.0.1/hook"}, "X-Webhook-URL"),
        ({"X-Webhook-URL": "https://10.1.2.3/hook"}, "X-Webhook-URL"),
        ({"X-Webhook-URL": "https://169.254.169.254/latest"}, "X-Webhook-URL"),
        ({"X-Webhook-URL": "https://user:pw@example.com/hook"}, "X-Webhook-URL"),
        ({"X-Webhook-URL": "ftp://example.com/hook"}, "X-Webhook-URL"),
        (
            {"X-Webhook-URL": "https://example.com/hook", "X-Webhook-Mode": "always"},
            "X-Webhook-Mode",
        ),
    ],
    ids=["http", "private", "metadata", "credentials", "ftp", "mode"],
)
def test_bad_webhooks_are_refused_at_submit(
    api_only_server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    headers: dict[str, str],
    field: str,
) -> None:
    before = ledger.balance(api_only_server.runtime.db, tenant.account_id)
    resp = client.post(SUBMIT, headers={**tenant.headers, **headers}, json={"prompt": "p"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == field
    assert ledger.balance(api_only_server.runtime.db, tenant.account_id) == before
    assert jobs.count_active(api_only_server.runtime.db, tenant.account_id) == 0


def test_loopback_needs_the_allow_setting(
    api_only_server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime = api_only_server.runtime
    runtime.settings = runtime.settings.model_copy(update={"webhook_allow_hosts": []})
    for url in ("https://127.0.0.1:8443/hook", "https://localhost/hook", "https://[::1]/hook"):
        resp = client.post(
            SUBMIT, headers={**tenant.headers, "X-Webhook-URL": url}, json={"prompt": "p"}
        )
        assert resp.status_code == 400, url
    monkeypatch.setenv("AURASERVE_WEBHOOK_ALLOW_HOSTS", "127.0.0.1, localhost,::1")
    assert load_settings().webhook_allow_hosts == ["127.0.0.1", "localhost", "::1"]
    monkeypatch.setenv("AURASERVE_WEBHOOK_ALLOW_HOSTS", '["10.0.0.0/8"]')
    assert load_settings().webhook_allow_hosts == ["10.0.0.0/8"]
    monkeypatch.setenv("AURASERVE_WEBHOOK_ALLOW_HOSTS", "not a host!")
    with pytest.raises(ConfigError, match="AURASERVE_WEBHOOK_ALLOW_HOSTS"):
        load_settings()


def test_retry_after_is_honoured_and_410_disables_the_url(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant, hooks: Receiver
) -> None:
    runtime = api_only_server.runtime
    busy = _submit(client, tenant, f"https://127.0.0.1:{hooks.port}/busy")
    client.post(f"/v2/requests/{busy}/cancel", headers=tenant.headers)
    _wait(lambda: _deliveries(runtime, _job_id(busy))[0].attempts == 1, what="the first attempt")
    [row] = _deliveries(runtime, _job_id(busy))
    assert row.state == "pending" and row.last_status_code == 503
    # The schedule says 0.3 s; the receiver's Retry-After: 7 wins.
    assert row.next_attempt_at - row.updated_at >= 6.9
    section = client.get(f"/v2/requests/status/{busy}", headers=tenant.headers).json()["webhook"]
    assert section["deliveries"][0]["attempts"] == 1
    assert section["deliveries"][0]["last_status_code"] == 503
    assert section["deliveries"][0]["next_attempt_at"] is not None

    gone = _submit(client, tenant, f"https://127.0.0.1:{hooks.port}/gone", mode="sync")
    _wait(lambda: _deliveries(runtime, _job_id(gone))[0].state == "gone", what="410 to disable")
    client.post(f"/v2/requests/{gone}/cancel", headers=tenant.headers)
    time.sleep(0.5)
    rows = _deliveries(runtime, _job_id(gone))
    assert [(r.state, r.last_status_code) for r in rows] == [("gone", 410)]  # no terminal callback
    assert hooks.paths().count("/gone") == 1


def test_delivery_row_commits_with_the_status(runtime: Runtime, tenant: Tenant) -> None:
    """The outbox row is written by the transition hook in the status change's transaction:
    present after a commit (without any API running), absent after a rollback."""
    db = runtime.db
    preset = runtime.settings.presets["auraflow-v0-3-512"]
    gen = build_request({"prompt": "p"}, model="auraflow-v0-3-512", preset=preset)
    kwargs: dict[str, Any] = {
        "account_id": tenant.account_id,
        "request": gen,
        "price": gen.price(preset),
        "max_queued": 10,
        "max_attempts": 1,
        "webhook_url": "https://hooks.example.com/x",
    }

    def submit_then_roll_back() -> None:
        with db.write() as conn:
            [made], _ = jobs.submit_in(
                conn,
                account_id=tenant.account_id,
                new_jobs=[jobs.NewJob(gen, gen.price(preset), kwargs["webhook_url"], "sync")],
                max_queued=10,
                max_attempts=1,
            )
            assert len(_deliveries_in(conn, made.id)) == 1  # written, not yet committed
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError, match="roll back"):
        submit_then_roll_back()
    with db.read() as conn:
        assert conn.execute(select(jobs_table.c.id)).first() is None
        assert conn.execute(select(webhook_deliveries.c.id)).first() is None
    sub = submit_one(db, **kwargs, webhook_mode="terminal")
    assert _deliveries(runtime, sub.job.id) == []  # terminal mode: nothing before the end
    [claimed] = jobs.claim(
        db, worker_id="w", models=["auraflow-v0-3-512"], max_images=4, lease_seconds=30
    )
    done = jobs.finish_unsuccessful(
        db, worker_id="w", job_id=claimed.id, status=JobStatus.ERROR, error="boom"
    )
    assert done is not None
    [row] = _deliveries(runtime, sub.job.id)
    assert row.terminal and row.state == "pending" and row.url == "https://hooks.example.com/x"
    assert json.loads(row.payload) == status_body(done, runtime.media.url)
    assert row.event_id == f"msg_{sub.job.id}_error"


def _deliveries_in(conn: Any, job_id: str) -> list[Any]:
    return conn.execute(
        select(webhook_deliveries.c.id).where(webhook_deliveries.c.job_id == job_id)
    ).all()


class FlakyReceiver(Receiver):
    """Answers 500 to its first `failures` requests, then behaves like /hook."""

    def __init__(self, port: int, secret: str, failures: int) -> None:
        super().__init__(port, secret)
        self.failures = failures

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.failures > 0:
            self.failures -= 1
            scope = {**scope, "path": "/fail"}  # unknown path → 404 from the base receiver
        await super().app(scope, receive, send)


def _serve_on(
    port: int, receiver: Receiver, cert: trustme.LeafCert, tmp: Path
) -> Callable[[], None]:
    """Start `receiver` on a fixed port (the restart test needs the same URL twice)."""
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(
        receiver.app,
        ssl_certfile=str(cert_path),
        ssl_keyfile=str(key_path),
        log_level="error",
        lifespan="off",
        access_log=False,
        interface="asgi3",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _wait(lambda: server.started, timeout=10, what="the receiver to start")

    def stop() -> None:
        server.should_exit = True
        thread.join(5)
        sock.close()

    return stop


def test_delivery_survives_receiver_outage_and_server_restart(
    settings: Settings,
    runtime: Runtime,
    server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    ca: trustme.CA,
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens here yet: the receiver is down
    url = f"https://127.0.0.1:{port}/hook"
    request_id = _submit(client, tenant, url, num_inference_steps=1, guidance_scale=1.0)
    assert wait_for_status(client, request_id, tenant.headers)["status"] == "COMPLETED"
    job_id = _job_id(request_id)
    _wait(lambda: _deliveries(runtime, job_id)[0].attempts >= 2, what="failed attempts")
    server.stop()
    for worker in runtime.workers:
        worker.stop()
    [row] = _deliveries(runtime, job_id)
    assert row.state == "pending" and row.last_status_code is None and "connect" in row.last_error
    attempts_before = row.attempts

    # Both come back: a new receiver on the same port (failing once more, then fine) and a new
    # server process on the same store and port.
    flaky = FlakyReceiver(port, tenant.webhook_secret, failures=1)
    stop_receiver = _serve_on(port, flaky, ca.issue_cert("127.0.0.1"), tmp_path)
    restarted = Runtime.open(settings)
    second = LiveServer(restarted).start()
    try:
        assert second.url == server.url
        _wait(lambda: _deliveries(restarted, job_id)[0].state == "delivered", what="the delivery")
        assert [r.path for r in flaky.requests] == ["/fail", "/hook"]
        ids = {r.headers["webhook-id"] for r in flaky.requests}
        assert ids == {row.event_id}  # one webhook-id across every retry
        for r in flaky.requests:
            payload = _verify(tenant.webhook_secret, r)
            assert payload["request_id"] == request_id and payload["status"] == "COMPLETED"
            assert abs(int(r.headers["webhook-timestamp"]) - time.time()) < 60  # re-signed
        [final] = _deliveries(restarted, job_id)
        assert final.attempts == attempts_before + 2 and final.last_status_code == 200
        with httpx.Client(base_url=second.url) as c:
            section = c.get(f"/v2/requests/status/{request_id}", headers=tenant.headers).json()[
                "webhook"
            ]
        assert section["deliveries"][0]["state"] == "delivered"
    finally:
        second.stop()
        restarted.close()
        stop_receiver()
