"""One webhook delivery attempt, connected to the address that passed the SSRF check.

Why not simply ``httpx.AsyncClient().post(url)``? Because httpx (like every client) resolves the
host name itself when it connects. Checking the name with `AddressPolicy` first and letting the
client resolve it again afterwards leaves a window in which the DNS answer can change ("DNS
rebinding"): the check sees a public address, the connection goes to 169.254.169.254. So we
resolve once, check every address, and then make the connection to exactly those addresses while
TLS still uses the *name* for SNI and certificate verification, so a pinned connection is as well
authenticated as a normal one.

How the pinning is done: httpcore (the transport layer under httpx, and one of its hard
dependencies) accepts a pluggable ``network_backend`` on its public `httpcore.AsyncConnectionPool`
API. `PinnedNetworkBackend.connect_tcp` ignores the resolver entirely and opens the TCP connection
to the checked IPs; httpcore then calls ``start_tls(server_hostname=<URL host>)`` on that stream as
usual. httpx's own transport offers no public hook for a network backend, so we talk to httpcore
directly; for a single POST whose response we barely read that is also the smaller surface: no
redirects (httpcore never follows them), no proxies from the environment, no cookies, no retries.

The result is a plain `DeliveryResult` the outbox stores; `next_delay` turns it into the time of
the next attempt following the Standard Webhooks retry schedule.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import socket
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal

import anyio
import anyio.to_thread
import httpcore
import httpx

from auraserve.errors import InvalidParameter
from auraserve.observability import metrics
from auraserve.webhooks.settings import DEFAULT_SCHEDULE
from auraserve.webhooks.ssrf import (
    AddressPolicy,
    BlockedAddress,
    IPAddress,
    validate_webhook_url,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SCHEDULE",
    "MAX_ATTEMPTS",
    "MAX_RESPONSE_BYTES",
    "MAX_RETRY_AFTER",
    "USER_AGENT",
    "DeliveryResult",
    "Outcome",
    "PinnedNetworkBackend",
    "default_ssl_context",
    "deliver",
    "next_delay",
    "parse_retry_after",
]

Outcome = Literal["delivered", "retry", "gone"]

MAX_ATTEMPTS = len(DEFAULT_SCHEDULE)

MAX_RETRY_AFTER = 36000.0
"""A receiver's Retry-After is honoured up to our own longest gap (10 h), so one misconfigured
header cannot park a delivery for weeks."""

MAX_RESPONSE_BYTES = 64 * 1024
"""We read at most this much of a response: we only need the status, and a hostile receiver must
not be able to make us buffer an endless body."""

DEFAULT_CONNECT_TIMEOUT = 5.0
MAX_ADDRESSES_TRIED = 4
"""Addresses of one name tried in turn when connecting fails (bounded: each may take a timeout)."""

USER_AGENT = "auraserve-webhooks/1"
_ERROR_EXCERPT = 200

# Headers we set ourselves; a caller's value for them would desynchronise framing or pinning.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryResult:
    """What happened to one attempt.

    Attributes:
        outcome: ``delivered`` (2xx), ``gone`` (410, or a URL that can never be delivered to: stop
            and disable), or ``retry`` (anything else: schedule another attempt).
        status_code: the HTTP status, or None when no response was received.
        error: a short, log-safe description of what went wrong; None when delivered.
        retry_after: the receiver's Retry-After in seconds, if it sent a parseable one.
        duration_ms: wall time of the attempt, DNS included.
        remote_address: the IP the connection was actually made to (for audit logs).
    """

    outcome: Outcome
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None
    duration_ms: float = 0.0
    remote_address: str | None = None

    @property
    def delivered(self) -> bool:
        return self.outcome == "delivered"


# ---------------------------------------------------------------------------------------------
# Pinned connections
# ---------------------------------------------------------------------------------------------


class PinnedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to pre-checked IP addresses.

    httpcore asks it to ``connect_tcp(host, port)`` with the URL's host name; we ignore the name's
    DNS and connect to the addresses `AddressPolicy.resolve_and_check` returned, in order. TLS is
    layered on afterwards by httpcore with ``server_hostname`` = the URL host, so SNI and hostname
    verification are unaffected. A request for any *other* host (which cannot happen with our
    single-origin pool, but would with a proxy or a future refactor) is refused rather than
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
        raise httpcore.ConnectError("webhook deliveries never use Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


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
        # (installed with httpx) rather than failing every delivery.
        try:
            import certifi

            context.load_verify_locations(cafile=certifi.where())
        except (ImportError, OSError):  # pragma: no cover - depends on the image
            pass
    return context


def default_ssl_context() -> ssl.SSLContext:
    """The verifying TLS context used when ``deliver`` is not given one.

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
# Retry-After and the retry schedule
# ---------------------------------------------------------------------------------------------

_DELAY_SECONDS_RE = re.compile(r"\d{1,10}(?:\.\d+)?")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header: delay-seconds or an HTTP date; None if absent/invalid.

    Dates in the past give 0. ``now`` (Unix seconds) is for tests.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if _DELAY_SECONDS_RE.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None instead of raising
        return None
    if when.tzinfo is None:  # "-0000" means UTC per RFC 5322; HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def next_delay(
    attempt: int,
    schedule: Sequence[float] = DEFAULT_SCHEDULE,
    *,
    jitter: float = 0.1,
    retry_after: float | None = None,
    max_retry_after: float = MAX_RETRY_AFTER,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before attempt number ``attempt`` (0-based), or None to give up.

    ``attempt`` is the number of attempts already made: 0 for the first delivery (delay
    ``schedule[0]``, normally 0), 1 after the first failure (5 s by default), and so on;
    once ``attempt >= len(schedule)`` the message is abandoned.

    Jitter (±10% by default) spreads retries so that many deliveries failing together during a
    receiver outage do not all come back in the same second. A receiver's ``Retry-After`` is
    honoured as a lower bound — we wait the larger of the schedule and Retry-After — capped at
    ``max_retry_after``; it never extends the number of attempts.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if attempt >= len(schedule):
        return None
    delay = float(schedule[attempt])
    if delay > 0 and jitter > 0:
        delay *= 1.0 + (rng if rng is not None else random).uniform(-jitter, jitter)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(float(retry_after), max_retry_after))
    return max(0.0, delay)


# ---------------------------------------------------------------------------------------------
# The attempt
# ---------------------------------------------------------------------------------------------


def _excerpt(data: bytes) -> str:
    text = data[: _ERROR_EXCERPT * 4].decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = " ".join(text.split())
    return text[:_ERROR_EXCERPT] + ("…" if len(text) > _ERROR_EXCERPT else "")


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


async def deliver(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    policy: AddressPolicy,
    timeout: float = 10.0,
    verify: ssl.SSLContext | bool | None = None,
    connect_timeout: float | None = None,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
    allow_http: bool = False,
) -> DeliveryResult:
    """POST ``body`` to ``url`` once and classify the outcome. Never raises for network trouble.

    Steps: re-validate the URL (a stored URL may predate a rule change); resolve and check the host
    with ``policy`` (all addresses must pass); connect to a checked address with SNI/certificate
    verification for the URL's host name; send; read at most ``max_response_bytes`` of the reply.

    Args:
        headers: typically `signing.signed_headers(...)`; Host, Content-Length and Connection are
            set here and cannot be overridden.
        timeout: bound on the whole attempt, DNS included, and on each read/write.
        verify: an SSLContext to trust, ``True``/``None`` for `default_ssl_context()`, or
            ``False`` to skip verification (development only).
        connect_timeout: bound on each TCP+TLS connect; defaults to min(5 s, timeout).
        allow_http: deliver to ``http://`` URLs too (development only; mirrors
            `validate_webhook_url`).

    Outcome: 2xx → ``delivered``; 410 → ``gone``; a URL that fails validation → ``gone`` (it can
    never succeed); redirects are *not* followed (following one would bypass the address check)
    → ``retry`` with error "redirect not followed"; everything else — 429, 5xx, other 4xx,
    timeouts, connection/TLS errors, DNS failures, blocked addresses — → ``retry``.
    """
    started = time.monotonic()

    def result(outcome: Outcome, **fields: object) -> DeliveryResult:
        metrics.observe_webhook(outcome)  # auraserve_webhook_attempts_total{outcome}
        return DeliveryResult(
            outcome=outcome,
            duration_ms=round((time.monotonic() - started) * 1000.0, 3),
            **fields,  # type: ignore[arg-type]
        )

    try:
        normalised = validate_webhook_url(url, allow_http=allow_http)
    except InvalidParameter as exc:
        return result("gone", error=f"invalid webhook URL: {exc.message}")

    parsed = httpx.URL(normalised)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    host_header = f"[{host}]" if ":" in host else host
    if parsed.port is not None:
        host_header += f":{parsed.port}"

    request_headers: list[tuple[bytes, bytes]] = [
        (b"Host", host_header.encode("ascii")),
        (b"User-Agent", USER_AGENT.encode("ascii")),
        (b"Content-Length", str(len(body)).encode("ascii")),
        (b"Connection", b"close"),
    ]
    if not any(k.lower() == "content-type" for k in headers):
        request_headers.append((b"Content-Type", b"application/json"))
    for key, value in headers.items():
        if key.lower() not in _RESERVED_HEADERS:
            request_headers.append((key.encode("latin-1"), value.encode("latin-1")))

    connect_limit = (
        min(DEFAULT_CONNECT_TIMEOUT, timeout) if connect_timeout is None else connect_timeout
    )
    extensions = {
        "timeout": {"connect": connect_limit, "read": timeout, "write": timeout, "pool": timeout}
    }
    target = httpcore.URL(
        scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=parsed.raw_path
    )

    backend: PinnedNetworkBackend | None = None
    try:
        with anyio.fail_after(timeout):
            addresses = await anyio.to_thread.run_sync(
                policy.resolve_and_check, host, port, abandon_on_cancel=True
            )
            backend = PinnedNetworkBackend(host, addresses)
            async with (
                httpcore.AsyncConnectionPool(
                    ssl_context=_ssl_context(verify) if parsed.scheme == "https" else None,
                    max_connections=1,
                    keepalive_expiry=0,
                    http1=True,
                    http2=False,
                    retries=0,
                    network_backend=backend,
                ) as pool,
                pool.stream(
                    "POST",
                    target,
                    headers=request_headers,
                    content=bytes(body),
                    extensions=extensions,
                ) as response,
            ):
                received = bytearray()
                async for chunk in response.aiter_stream():
                    received += chunk[: max_response_bytes - len(received)]
                    if len(received) >= max_response_bytes:
                        break
    except BlockedAddress as exc:
        logger.warning("webhook delivery blocked: %s", exc)
        return result("retry", error=f"blocked address: {exc}")
    except TimeoutError:
        return result(
            "retry",
            error=f"timed out after {timeout:g} s",
            remote_address=backend.connected_address if backend else None,
        )
    except httpcore.ConnectTimeout:
        return result("retry", error=f"connect timeout after {connect_limit:g} s")
    except httpcore.TimeoutException as exc:
        kind = {
            httpcore.ReadTimeout: "read timeout",
            httpcore.WriteTimeout: "write timeout",
        }.get(type(exc), "timeout")
        return result(
            "retry",
            error=f"{kind} after {timeout:g} s",
            remote_address=backend.connected_address if backend else None,
        )
    except httpcore.ConnectError as exc:
        return result("retry", error=f"connection failed: {_describe(exc)}")
    except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
        return result(
            "retry",
            error=f"{type(exc).__name__}: {_describe(exc)}",
            remote_address=backend.connected_address if backend else None,
        )
    except socket.gaierror as exc:
        return result("retry", error=f"DNS resolution failed for {host!r}: {_describe(exc)}")
    except OSError as exc:
        return result("retry", error=f"network error: {_describe(exc)}")
    except Exception as exc:  # a bug must not kill the outbox loop; log it loudly and retry
        logger.exception("unexpected error delivering webhook to %s", host)
        return result("retry", error=f"unexpected error: {type(exc).__name__}: {_describe(exc)}")

    status = response.status
    remote = backend.connected_address
    if 200 <= status < 300:
        return result("delivered", status_code=status, remote_address=remote)
    retry_after = parse_retry_after(_header(response.headers, b"retry-after"))
    if status == 410:
        return result("gone", status_code=status, error="HTTP 410 Gone", remote_address=remote)
    if 300 <= status < 400:
        location = _header(response.headers, b"location")
        detail = (
            f" (HTTP {status}" + (f" to {_excerpt(location.encode())}" if location else "") + ")"
        )
        return result(
            "retry",
            status_code=status,
            error="redirect not followed" + detail,
            retry_after=retry_after,
            remote_address=remote,
        )
    excerpt = _excerpt(bytes(received))
    return result(
        "retry",
        status_code=status,
        error=f"HTTP {status}" + (f": {excerpt}" if excerpt else ""),
        retry_after=retry_after,
        remote_address=remote,
    )
