"""Fixtures for the webhook tests: a test CA and real HTTPS receivers on loopback.

The receivers are uvicorn servers in background threads, serving TLS with certificates issued by
a `trustme` CA, so deliveries exercise the real TCP, TLS and HTTP/1.1 path end to end. Every
request is checked with the reference `standardwebhooks` library and recorded, so tests can
assert both what the client concluded and what the receiver actually saw (or did not see).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvicorn
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from auraserve.webhooks.signing import new_secret

# DNS for made-up names is the outbound guard's fixture; the delivery tests use it too.
from tests.outbound.conftest import fake_dns  # noqa: F401

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

NAMED_HOST = "hooks.example.test"
"""A made-up name (no DNS exists for it) used to prove connections are pinned."""


@dataclass
class Recorded:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    client_ip: str | None


@dataclass
class Receiver:
    """A running HTTPS receiver and what it has seen."""

    port: int
    secret: str
    requests: list[Recorded] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    endless_stopped_after: float | None = None

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A tiny raw-ASGI app; raw so that status, headers and streaming are fully controlled."""
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            Webhook(self.secret).verify(body, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        path = scope["path"]
        client = scope.get("client")
        self.requests.append(Recorded(path, headers, body, verified, client[0] if client else None))

        async def respond(status: int, extra: list[tuple[bytes, bytes]] | None = None) -> None:
            payload = b'{"ok":true}' if status < 300 else b'{"error":"nope"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), *(extra or [])],
                }
            )
            await send({"type": "http.response.body", "body": payload})

        if path == "/hook":
            await respond(200 if verified else 401)
        elif path == "/gone":
            await respond(410)
        elif path == "/busy":
            await respond(503, [(b"retry-after", b"7")])
        elif path == "/ratelimited":
            when = formatdate(time.time() + 120, usegmt=True).encode()
            await respond(429, [(b"retry-after", when)])
        elif path == "/redirect":
            target = f"https://localhost:{self.port}/target".encode()
            await respond(307, [(b"location", target)])
        elif path == "/slow":
            # Answers after 5 s, or never if the client gives up first.
            gone = _watch_disconnect(receive)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not (gone.is_set() or self.stopping.is_set()):
                await asyncio.sleep(0.02)
            if not gone.is_set():
                await respond(200)
        elif path == "/endless":
            # A 200 whose body never ends: the client must stop reading at its cap.
            gone = _watch_disconnect(receive)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            chunk = b"x" * 65536
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and not (gone.is_set() or self.stopping.is_set()):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await asyncio.sleep(0.001)
            self.endless_stopped_after = time.monotonic()
            await send({"type": "http.response.body", "body": b""})
        else:
            await respond(404)


def _watch_disconnect(receive: Receive) -> asyncio.Event:
    """Set the returned event when the client disconnects (the request body is already read)."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    task = asyncio.get_running_loop().create_task(watch())
    _background.add(task)
    task.add_done_callback(_background.discard)
    return gone


_background: set[asyncio.Task[None]] = set()


def _serve(receiver: Receiver, cert: trustme.LeafCert, tmp: Path) -> Iterator[Receiver]:
    cert_path = tmp / "cert.pem"
    key_path = tmp / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(cert_path, append=True)
    cert.private_key_pem.write_to_path(key_path)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    receiver.port = sock.getsockname()[1]
    config = uvicorn.Config(
        receiver.app,
        ssl_certfile=str(cert_path),
        ssl_keyfile=str(key_path),
        log_level="error",
        lifespan="off",
        interface="asgi3",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test receiver did not start")
        time.sleep(0.01)
    try:
        yield receiver
    finally:
        receiver.stopping.set()
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_pem_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(path)
    return path


@pytest.fixture(scope="session")
def trusting_context(ca: trustme.CA) -> ssl.SSLContext:
    """A normal verifying client context that trusts the test CA (and nothing else)."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cadata=ca.cert_pem.bytes().decode()
    )
    return context


@pytest.fixture(scope="session")
def webhook_secret() -> str:
    return new_secret()


@pytest.fixture(scope="session")
def _localhost_receiver(
    ca: trustme.CA, webhook_secret: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Receiver]:
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    yield from _serve(Receiver(0, webhook_secret), cert, tmp_path_factory.mktemp("localhost"))


@pytest.fixture(scope="session")
def _named_receiver(
    ca: trustme.CA, webhook_secret: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Receiver]:
    cert = ca.issue_cert(NAMED_HOST)  # deliberately no IP or localhost names
    yield from _serve(Receiver(0, webhook_secret), cert, tmp_path_factory.mktemp("named"))


@pytest.fixture
def receiver(_localhost_receiver: Receiver) -> Receiver:
    """HTTPS receiver with a certificate for localhost / 127.0.0.1 / ::1, history cleared."""
    _localhost_receiver.requests.clear()
    return _localhost_receiver


@pytest.fixture
def named_receiver(_named_receiver: Receiver) -> Receiver:
    """HTTPS receiver whose certificate is valid only for ``hooks.example.test``."""
    _named_receiver.requests.clear()
    return _named_receiver
