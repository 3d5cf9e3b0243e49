"""HTTP limits against a real server on loopback: slow and oversized clients are cut off within
their limits while a normal client keeps being served."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from auraserve.api.app import create_app
from auraserve.api.server import server_config
from auraserve.config import Settings
from auraserve.runtime import Runtime
from tests.conftest import make_tenant

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_CONNECTIONS = 40
# Scheduling on a loaded CI machine: a close is "within the timeout" up to this much later.
SLACK = 1.5


class Limited:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        s = runtime.settings
        self.address = (s.host, s.port)
        self.url = f"http://{s.host}:{s.port}"
        config = server_config(create_app(runtime), s, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)

    def open_connections(self) -> int:
        return len(self.server.server_state.connections)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def limited(settings: Settings) -> Iterator[Limited]:
    tight = settings.model_copy(
        update={
            "header_timeout_seconds": HEADER_TIMEOUT,
            "body_timeout_seconds": BODY_TIMEOUT,
            "max_connections": MAX_CONNECTIONS,
            "max_header_bytes": 16 * 1024,
            "max_header_line_bytes": 4 * 1024,
            "keep_alive_max_requests": 3,
        }
    )
    runtime = Runtime.open(tight)
    server = Limited(runtime)
    yield server
    server.stop()
    runtime.close()


def _closed_after(sock: socket.socket, *, drip: bytes | None = None, every: float = 0.2) -> float:
    """Seconds until the server closes `sock`, sending `drip` every `every` seconds meanwhile."""
    start = time.monotonic()
    sock.settimeout(every)
    while time.monotonic() - start < 30:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - start
        if drip is not None:
            try:
                sock.sendall(drip)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start
    raise AssertionError("the server never closed the connection")


class Prober:
    """A normal client asking /health in a loop; records every latency and every failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    resp = client.get("/health")
                    if resp.status_code != 200:
                        self.failures.append(f"status {resp.status_code}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.latencies.append(time.monotonic() - start)
                time.sleep(0.02)


def test_slow_headers_are_closed_within_the_timeout_while_others_are_served(
    limited: Limited,
) -> None:
    slow = [limited.connect() for _ in range(20)]
    for sock in slow:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    with Prober(limited.url) as prober:
        results: list[float] = []
        threads = [
            threading.Thread(
                target=lambda s=s: results.append(_closed_after(s, drip=b"X-Slow: 1\r\n"))
            )
            for s in slow
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(results) == len(slow)
    assert max(results) < HEADER_TIMEOUT + SLACK, results
    assert prober.failures == []
    assert len(prober.latencies) >= 3  # served all along (few on a loaded machine)


def test_a_silent_connection_is_closed_after_the_header_timeout(limited: Limited) -> None:
    with limited.connect() as sock:
        assert _closed_after(sock) < HEADER_TIMEOUT + SLACK


def test_a_stalled_body_is_closed_within_the_timeout(limited: Limited) -> None:
    with Prober(limited.url) as prober, limited.connect() as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"prompt": "'
        )
        elapsed = _closed_after(sock)
    assert elapsed < BODY_TIMEOUT + SLACK
    assert prober.failures == []


def _post_head(key: str, length: int) -> bytes:
    return (
        b"POST /auraflow-v0-3-512/v1/auraflow-v0-3-request HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nOcp-Apim-Subscription-Key: " + key.encode() + b"\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\n"
    )


def test_a_dripping_body_is_closed_within_the_timeout(limited: Limited) -> None:
    key = make_tenant(limited.runtime).key
    with limited.connect() as sock:
        sock.sendall(_post_head(key, 1000) + b'{"prompt": "')
        # A byte every 0.2 s never stalls for a whole second, yet moves far under 1 KiB/s.
        assert _closed_after(sock, drip=b"a") < BODY_TIMEOUT + SLACK


def test_a_slow_but_moving_body_is_not_cut(limited: Limited) -> None:
    key = make_tenant(limited.runtime).key
    body = b'{"prompt": "' + b"a" * 3000 + b'"}'
    with limited.connect() as sock:
        sock.sendall(_post_head(key, len(body)))
        start = time.monotonic()
        for i in range(0, len(body), 300):  # 300 bytes every 0.2 s: 2 s in all, past the timeout
            sock.sendall(body[i : i + 300])
            time.sleep(0.2)
        assert time.monotonic() - start > BODY_TIMEOUT
        sock.settimeout(10)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 202"), reply[:300]


@pytest.mark.parametrize(
    ("name", "headers", "says"),
    [
        ("one 64 KB header", [("X-Big", "a" * 65536)], "header line exceeds 4096"),
        ("one 5 KB header", [("X-Big", "a" * 5000)], "header line exceeds 4096"),
        ("many short headers", [(f"X-{i}", "a" * 1000) for i in range(20)], "exceed 16384"),
        ("a 5 KB URL", [], "header line exceeds 4096"),
    ],
)
def test_oversized_headers_get_431_in_the_queue_shape(
    limited: Limited, name: str, headers: list[tuple[str, str]], says: str
) -> None:
    path = "/health" + ("?q=" + "a" * 5000 if name == "a 5 KB URL" else "")
    with httpx.Client(base_url=limited.url, timeout=10) as client:
        resp = client.get(path, headers=headers)
        assert resp.status_code == 431, resp.text
        assert resp.headers["connection"] == "close"
        body = resp.json()
        assert body["error"] == "Request Header Fields Too Large"
        assert says in body["message"]
        # Headers just under both limits pass.
        ok = client.get("/health", headers=[(f"X-{i}", "a" * 1000) for i in range(12)])
        assert ok.status_code == 200


def test_the_connection_cap_closes_idle_connections_first(limited: Limited) -> None:
    idle = [limited.connect() for _ in range(MAX_CONNECTIONS * 2)]
    try:
        time.sleep(0.3)
        assert limited.open_connections() <= MAX_CONNECTIONS
        with httpx.Client(base_url=limited.url, timeout=5) as client:
            for _ in range(10):
                assert client.get("/health").status_code == 200
        # The oldest idle ones made room: the server closed them, not the newest.
        assert _closed_after(idle[0]) < 1.0
    finally:
        for sock in idle:
            sock.close()


def test_keep_alive_connections_close_after_max_requests(limited: Limited) -> None:
    with httpx.Client(base_url=limited.url, timeout=5) as client:
        replies = [client.get("/health") for _ in range(4)]
    assert [r.status_code for r in replies] == [200] * 4
    assert [r.headers.get("connection") for r in replies[:3]] == [None, None, "close"]


def test_a_stalled_body_is_closed_before_the_application_sees_it(
    limited: Limited, caplog: pytest.LogCaptureFixture
) -> None:
    # The body is collected before the request is handed over (api/server.py), so closing a
    # stalled one leaves the application nothing to fail on: no half-read body, no traceback.
    key = make_tenant(limited.runtime).key
    with caplog.at_level("WARNING"), limited.connect() as sock:
        sock.sendall(_post_head(key, 1000) + b'{"prompt": "')
        assert _closed_after(sock) < BODY_TIMEOUT + SLACK
        time.sleep(0.2)
    assert [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []


def test_expect_100_continue_is_answered_before_the_body(limited: Limited) -> None:
    # Such a client waits for `100 Continue` before it sends its body: it must not be held.
    key = make_tenant(limited.runtime).key
    body = b'{"prompt": "a cat"}'
    head = _post_head(key, len(body)).replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
    with limited.connect() as sock:
        sock.sendall(head)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 202"), "no answer after the body"


def test_malformed_http_gets_400_in_the_json_error_shape(limited: Limited) -> None:
    """h11 cannot parse it: the answer is the queue shape's JSON, like every other refusal
    (uvicorn's own is plain text)."""
    sock = limited.connect()
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    finally:
        sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), received
    assert b"content-type: application/json" in head.lower()
    parsed = json.loads(body)
    assert parsed["field"] == "request" and "malformed HTTP" in parsed["message"]
