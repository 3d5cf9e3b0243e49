"""Outbound HTTP requests that connect only to the addresses the policy checked.

Why not simply ``httpx.AsyncClient().get(url)``? Because httpx (like every client) resolves the
host name itself when it connects. Checking the name with `AddressPolicy` first and letting the
client resolve it again afterwards leaves a window in which the DNS answer can change ("DNS
rebinding"): the check sees a public address, the connection goes to 169.254.169.254. So we
resolve once, check every address, and then make the connection to exactly those addresses while
TLS still uses the *name* for SNI and certificate verification (and the Host header still names
it), so a pinned connection is as well authenticated as a normal one.

How the pinning is done: httpcore (the transport layer under httpx, and one of its hard
dependencies) accepts a pluggable ``network_backend`` on its public `httpcore.AsyncConnectionPool`
API. `PinnedNetworkBackend.connect_tcp` ignores the resolver entirely and opens the TCP connection
to the checked IPs; httpcore then calls ``start_tls(server_hostname=<URL host>)`` on that stream as
usual. httpx's transport is a thin adapter over such a pool but offers no public hook for the
backend, so `PinnedTransport` gives it ours; everything above (request building, exception
mapping, streaming) is httpx's own.

`OutboundCall` is the one way requests leave the process (webhook deliveries, image fetches): a
fresh single-connection client per request, no redirects followed (following one would bypass the
address check), no proxies or netrc from the environment, no cookies kept, no retries, bounded by
`OutboundLimits`, and `read_capped` to read a bounded body.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
import httpcore
import httpx

from auraserve.outbound.limits import OutboundLimits
from auraserve.outbound.policy import IPAddress, OutboundPolicy

__all__ = [
    "MAX_ADDRESSES_TRIED",
    "OutboundCall",
    "PinnedNetworkBackend",
    "PinnedTransport",
    "default_ssl_context",
    "pinned_client",
    "read_capped",
]

MAX_ADDRESSES_TRIED = 4
"""Addresses of one name tried in turn when connecting fails (bounded: each may take a timeout)."""


# ---------------------------------------------------------------------------------------------
# Pinned connections
# ---------------------------------------------------------------------------------------------


class PinnedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to pre-checked IP addresses.

    httpcore asks it to ``connect_tcp(host, port)`` with the URL's host name; we ignore the name's
    DNS and connect to the addresses `AddressPolicy.resolve_and_check` returned, in order. TLS is
    layered on afterwards by httpcore with ``server_hostname`` = the URL host, so SNI and hostname
    verification are unaffected. A request for any *other* host (which cannot happen with our
    single-origin client, but would with a proxy or a future refactor) is refused rather than
    silently pinned to the wrong place.
    """

    def __init__(
        self,
        host: str,
        addresses: Sequence[IPAddress],
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one pinned address is required")
        self.host = host.lower()
        self.addresses: tuple[IPAddress, ...] = tuple(addresses)
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()
        self.connected_address: str | None = None

    @staticmethod
    def _connect_target(addr: IPAddress) -> str:
        # Dial IPv4-mapped addresses as plain IPv4: same destination, works without dual-stack.
        mapped = getattr(addr, "ipv4_mapped", None)
        return str(mapped if mapped is not None else addr)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if host.lower() != self.host:
            raise httpcore.ConnectError(
                f"refusing to connect to {host!r}: this connection is pinned to {self.host!r}"
            )
        last_exc: Exception | None = None
        for addr in self.addresses[:MAX_ADDRESSES_TRIED]:
            target = self._connect_target(addr)
            try:
                stream = await self._inner.connect_tcp(
                    target,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_exc = exc
                continue
            self.connected_address = target
            return stream
        assert last_exc is not None
        raise last_exc

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("outbound requests never use Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport over a single-connection pool that dials only `backend`'s
    addresses: HTTP/1.1, no retries, no keep-alive, no proxy."""

    def __init__(self, backend: PinnedNetworkBackend, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False, http1=True, http2=False, retries=0)
        # The one private name we rely on: httpx builds this pool in __init__ and only ever
        # delegates to it. Should a future httpx keep its pool elsewhere, refuse to run rather
        # than send through an unpinned one.
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError("this httpx keeps no connection pool where one can be pinned")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=1,
            keepalive_expiry=0,
            http1=True,
            http2=False,
            retries=0,
            network_backend=backend,
        )
        self.backend = backend


def pinned_client(
    backend: PinnedNetworkBackend,
    limits: OutboundLimits,
    *,
    verify: ssl.SSLContext | bool | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx.AsyncClient:
    """The client every outbound request is sent with: pinned to `backend`, bounded by
    `limits`, and with nothing taken from the environment (proxies, netrc)."""
    return httpx.AsyncClient(
        transport=PinnedTransport(backend, _ssl_context(verify)),
        timeout=httpx.Timeout(
            connect=limits.connect, read=limits.total, write=limits.total, pool=limits.total
        ),
        follow_redirects=False,
        trust_env=False,
        # Identity only: the body cap then counts the bytes on the wire, and no decoder runs
        # on what a hostile server sends. One request per client: the connection is closed.
        headers={"Accept-Encoding": "identity", "Connection": "close", **(headers or {})},
    )


# ---------------------------------------------------------------------------------------------
# TLS trust
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _cached_default_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile or None, capath=capath or None)
    context = ssl.create_default_context()
    if context.cert_store_stats().get("x509_ca", 0) == 0:
        # Slim containers often ship no system CA bundle; fall back to Mozilla's via certifi
        # (installed with httpx) rather than failing every request.
        try:
            import certifi

            context.load_verify_locations(cafile=certifi.where())
        except (ImportError, OSError):  # pragma: no cover - depends on the image
            pass
    return context


def default_ssl_context() -> ssl.SSLContext:
    """The verifying TLS context used when a request is not given one.

    Honours the standard ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` variables (as OpenSSL, requests and
    httpx do: when set they *replace* the trust store, which is how operators add a private CA),
    otherwise uses the system store, falling back to certifi when the system store is empty.
    Contexts are cached per variable values because loading a bundle costs milliseconds.
    """
    return _cached_default_context(
        os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None
    )


def _ssl_context(verify: ssl.SSLContext | bool | None) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        # Development only: encrypts, but accepts any certificate for any name.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return default_ssl_context()


# ---------------------------------------------------------------------------------------------
# One request
# ---------------------------------------------------------------------------------------------


class OutboundCall:
    """One outbound request through the guard.

    ``stream`` resolves the URL's host once, refuses unless the policy passes every address,
    connects to those addresses only, and yields the response with its body unread, all within
    ``limits.total`` (`TimeoutError` past it). The URL must already have passed
    `OutboundPolicy.check_url` (the caller decides what a bad URL means for it).

    Raises (from ``stream``): `BlockedAddress`; `socket.gaierror` (DNS failed); `TimeoutError`;
    `httpx.TransportError` subclasses (connect, TLS, read, protocol trouble).
    """

    def __init__(
        self,
        policy: OutboundPolicy,
        limits: OutboundLimits,
        *,
        verify: ssl.SSLContext | bool | None = None,
    ) -> None:
        self.policy = policy
        self.limits = limits
        self.verify = verify
        self._backend: PinnedNetworkBackend | None = None

    @property
    def remote_address(self) -> str | None:
        """The IP the connection was made to; None before one was (for logs and audits)."""
        return self._backend.connected_address if self._backend is not None else None

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> AsyncIterator[httpx.Response]:
        parsed = httpx.URL(url)
        if parsed.scheme != "https" and not (parsed.scheme == "http" and self.policy.allow_http):
            raise ValueError(f"{parsed.scheme!r} URLs are not allowed by the outbound policy")
        host = parsed.raw_host.decode("ascii")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        with anyio.fail_after(self.limits.total):
            # Resolved off the event loop, once: the connection goes only to these addresses.
            addresses = await anyio.to_thread.run_sync(
                self.policy.addresses.resolve_and_check, host, port, abandon_on_cancel=True
            )
            self._backend = PinnedNetworkBackend(host, addresses)
            async with (
                pinned_client(self._backend, self.limits, verify=self.verify) as client,
                client.stream(method, parsed, headers=headers, content=content) as response,
            ):
                yield response


async def read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body, and whether the server sent more.

    Reading stops as soon as the cap is passed, so a hostile server cannot make us buffer an
    endless body; leaving the stream then closes the connection.
    """
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limit:
            return bytes(body[:limit]), True
    return bytes(body), False
