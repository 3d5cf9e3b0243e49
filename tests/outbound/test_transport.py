"""Requests through the pinned transport, against real origins on loopback.

The only stand-in is DNS for made-up names (`fake_dns`): the test environment has none, and
controlling the answers is exactly what the pinning tests need.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time

import httpcore
import httpx
import pytest

from auraserve.errors import BlockedAddress
from auraserve.outbound import OutboundLimits, OutboundPolicy
from auraserve.outbound.transport import (
    OutboundCall,
    PinnedNetworkBackend,
    PinnedTransport,
    default_ssl_context,
    pinned_client,
    read_capped,
)
from tests.outbound.conftest import NAMED_HOST, PNG, FakeDNS, Origin

LOOPBACK = OutboundPolicy.from_allow_list(["127.0.0.1"], allow_http=True)
LIMITS = OutboundLimits(total=5.0, connect=2.0, max_body_bytes=64 * 1024)


async def _get(
    url: str,
    policy: OutboundPolicy = LOOPBACK,
    limits: OutboundLimits = LIMITS,
    verify: ssl.SSLContext | bool | None = None,
) -> tuple[int, bytes, bool, str | None]:
    call = OutboundCall(policy, limits, verify=verify)
    async with call.stream("GET", url) as response:
        body, more = await read_capped(response, limits.max_body_bytes)
    return response.status_code, body, more, call.remote_address


async def test_pinned_to_the_checked_address_with_tls_verifying_the_name(
    named_tls_origin: Origin, fake_dns: FakeDNS, trusting_context: ssl.SSLContext
) -> None:
    """TCP goes to the checked IP; TLS (SNI + certificate) and Host use the URL's name.

    The name resolves to 127.0.0.1 once, and to the metadata address on any later lookup (DNS
    rebinding). Success proves the connection went to the first, checked answer without a
    second lookup, and that the certificate, valid *only* for the name (no IP SANs), was
    verified against the name rather than the address dialled.
    """
    answers = iter([["127.0.0.1"]])
    fake_dns.set_dynamic(NAMED_HOST, lambda: next(answers, ["169.254.169.254"]))
    url = named_tls_origin.url("/image.png", host=NAMED_HOST)
    status, body, more, remote = await _get(url, verify=trusting_context)
    assert (status, body, more, remote) == (200, PNG, False, "127.0.0.1")
    assert fake_dns.calls == [NAMED_HOST], "the name must be resolved exactly once"
    [seen] = named_tls_origin.requests
    assert seen.client_ip == "127.0.0.1"
    assert seen.headers["host"] == f"{NAMED_HOST}:{named_tls_origin.port}"
    assert seen.headers["accept-encoding"] == "identity"
    assert seen.headers["connection"] == "close"

    # The next request resolves again, sees the rebinding answer and never connects.
    with pytest.raises(BlockedAddress, match="metadata"):
        await _get(url, verify=trusting_context)
    assert len(named_tls_origin.requests) == 1


async def test_the_certificate_is_checked_against_the_url_host(
    named_tls_origin: Origin, trusting_context: ssl.SSLContext
) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await _get(named_tls_origin.url("/image.png"), verify=trusting_context)
    assert named_tls_origin.requests == []


async def test_redirects_are_returned_not_followed(origin: Origin) -> None:
    status, _, _, _ = await _get(origin.url("/redirect"))
    assert status == 302
    assert [r.path for r in origin.requests] == ["/redirect"]


async def test_the_body_read_stops_at_the_cap(origin: Origin) -> None:
    limits = OutboundLimits(total=5.0, connect=2.0, max_body_bytes=1000)
    status, body, more, _ = await _get(origin.url("/big"), limits=limits)
    assert (status, len(body), more) == (200, 1000, True)
    # A body that fits is read whole and says so.
    _, body, more, _ = await _get(origin.url("/image.png"), limits=limits)
    assert (body, more) == (PNG, False)


async def test_the_whole_exchange_is_bounded(origin: Origin) -> None:
    limits = OutboundLimits(total=0.5, connect=0.5, max_body_bytes=1000)
    started = time.monotonic()
    with pytest.raises((TimeoutError, httpx.ReadTimeout)):
        await _get(origin.url("/slow"), limits=limits)
    assert time.monotonic() - started < 2.0


async def test_a_private_name_is_refused_before_any_connection(fake_dns: FakeDNS) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        fake_dns.set("inside.example.test", "127.0.0.1")
        call = OutboundCall(OutboundPolicy(allow_http=True), LIMITS)
        with pytest.raises(BlockedAddress, match="loopback"):
            async with call.stream("GET", f"http://inside.example.test:{port}/"):
                pass
        assert call.remote_address is None
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected


async def test_environment_proxies_are_ignored(
    origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy would resolve the name itself, past the check: requests never use one."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # discard port: nothing answers
    status, _, _, remote = await _get(origin.url("/image.png"))
    assert (status, remote) == (200, "127.0.0.1")


async def test_plain_http_needs_the_policy_to_allow_it(origin: Origin) -> None:
    strict = OutboundPolicy.from_allow_list(["127.0.0.1"])
    with pytest.raises(ValueError, match="'http' URLs are not allowed"):
        await _get(origin.url("/image.png"), policy=strict)
    assert origin.requests == []


async def test_the_client_factory_sends_through_the_pinned_backend(origin: Origin) -> None:
    """A made-up name that no resolver knows reaches the origin: the backend dialled it."""
    backend = PinnedNetworkBackend("nowhere.example.test", [ipaddress.ip_address("127.0.0.1")])
    async with pinned_client(backend, LIMITS, headers={"User-Agent": "t"}) as client:
        assert isinstance(client._transport, PinnedTransport)
        response = await client.get(f"http://nowhere.example.test:{origin.port}/image.png")
    assert response.status_code == 200 and response.content == PNG
    assert backend.connected_address == "127.0.0.1"
    assert origin.requests[0].headers["user-agent"] == "t"


async def test_backend_refuses_other_hosts() -> None:
    backend = PinnedNetworkBackend("hooks.example.test", [ipaddress.ip_address("127.0.0.1")])
    with pytest.raises(httpcore.ConnectError, match="pinned"):
        await backend.connect_tcp("evil.example.test", 443)
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_unix_socket("/var/run/docker.sock")
    with pytest.raises(ValueError, match="at least one"):
        PinnedNetworkBackend("hooks.example.test", [])


async def test_backend_falls_back_across_checked_addresses(origin: Origin) -> None:
    backend = PinnedNetworkBackend(
        "fallback.example.test",
        [ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.1")],
    )
    async with pinned_client(backend, LIMITS) as client:
        response = await client.get(f"http://fallback.example.test:{origin.port}/image.png")
    assert response.status_code == 200
    assert backend.connected_address == "127.0.0.1"  # nothing listens on 127.0.0.2


def test_default_trust_verifies_and_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    system = default_ssl_context()
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname
    assert default_ssl_context() is system  # cached: loading a bundle costs milliseconds
