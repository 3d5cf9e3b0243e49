"""Fixtures for the outbound guard's tests: DNS for made-up names, and real origins on loopback.

Origins are `http.server` servers in background threads (plain HTTP, or TLS with a certificate
from a `trustme` CA), so requests go over the real TCP, TLS and HTTP/1.1 path. Each records what
it received, so tests can assert what arrived (or that nothing did).
"""

from __future__ import annotations

import io
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trustme
from PIL import Image

NAMED_HOST = "origin.example.test"
"""A made-up name (no DNS exists for it): reaching it proves the connection was pinned."""


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
"""A 1×1 PNG, for image fetches."""


class FakeDNS:
    """Stands in for DNS for chosen made-up names only; every other name resolves normally.

    DNS is not available in the test environment, and the point of several tests is to control
    exactly what a name resolves to — including making the answer change between lookups, as a
    DNS-rebinding attacker would. Only `socket.getaddrinfo` is replaced; connections are real.
    """

    def __init__(self) -> None:
        self.answers: dict[str, Callable[[], list[str]]] = {}
        self.calls: list[str] = []
        self._real = socket.getaddrinfo

    def set(self, name: str, *ips: str) -> None:
        """Make ``name`` resolve to ``ips`` (none: NXDOMAIN)."""
        self.answers[name.lower()] = lambda: list(ips)

    def set_dynamic(self, name: str, answer: Callable[[], list[str]]) -> None:
        """Make ``name`` resolve to whatever ``answer()`` returns at each lookup."""
        self.answers[name.lower()] = answer

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else host
        key = name.lower().rstrip(".") if isinstance(name, str) else None
        if key is None or key not in self.answers:
            return self._real(host, port, *args, **kwargs)
        self.calls.append(key)
        result: list[Any] = []
        for ip in self.answers[key]():
            if ":" in ip:
                result.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)))
            else:
                result.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)))
        if not result:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return result


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    dns = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", dns.getaddrinfo)
    return dns


@dataclass
class Seen:
    """One request as the origin saw it."""

    method: str
    path: str
    headers: dict[str, str]
    client_ip: str


@dataclass
class Origin:
    """A running origin on 127.0.0.1 and what it has received."""

    port: int
    scheme: str
    requests: list[Seen] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    """Routes: /image.png (a PNG), /hook (POST: 200), /redirect (302 to the metadata address),
    /big (1 MiB), /slow (answers after 3 s); anything else 404."""

    origin: Origin

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.origin.requests.append(
            Seen(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                self.client_address[0],
            )
        )
        status, media_type, body, extra = 404, "text/plain", b"no", {}
        if self.path == "/image.png":
            status, media_type, body = 200, "image/png", PNG
        elif self.path == "/hook":
            status, media_type, body = 200, "application/json", b'{"ok":true}'
        elif self.path == "/redirect":
            status, extra = 302, {"Location": "http://169.254.169.254/latest/meta-data"}
        elif self.path == "/big":
            status, media_type, body = 200, "application/octet-stream", b"x" * (1 << 20)
        elif self.path == "/slow":
            time.sleep(3.0)
            status, media_type, body = 200, "text/plain", b"late"
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client stopped reading (body caps, timeouts)
            pass

    do_GET = _answer
    do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


def _serve(context: ssl.SSLContext | None) -> Iterator[Origin]:
    origin = Origin(port=0, scheme="https" if context else "http")
    handler = type("Handler", (_Handler,), {"origin": origin})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    origin.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def trusting_context(ca: trustme.CA) -> ssl.SSLContext:
    """A normal verifying client context that trusts the test CA (and nothing else)."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.cert_pem.bytes().decode())


@pytest.fixture(scope="session")
def _plain_origin() -> Iterator[Origin]:
    yield from _serve(None)


@pytest.fixture(scope="session")
def _named_tls_origin(ca: trustme.CA) -> Iterator[Origin]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(NAMED_HOST).configure_cert(context)  # deliberately no IP or localhost names
    yield from _serve(context)


@pytest.fixture
def origin(_plain_origin: Origin) -> Origin:
    """Plain HTTP origin on 127.0.0.1, history cleared."""
    _plain_origin.requests.clear()
    return _plain_origin


@pytest.fixture
def named_tls_origin(_named_tls_origin: Origin) -> Origin:
    """HTTPS origin on 127.0.0.1 whose certificate is valid only for `NAMED_HOST`."""
    _named_tls_origin.requests.clear()
    return _named_tls_origin
