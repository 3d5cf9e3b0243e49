"""One webhook delivery attempt, through the outbound guard.

The URL is checked again (a stored URL may predate a rule change), then POSTed once through
`outbound.transport.OutboundCall`: the host is resolved once, every address must pass the
process's `OutboundPolicy` (the one the image fetches use too), and the connection is pinned to
the checked addresses with TLS verifying the name. No redirects are followed, the whole attempt
is bounded by `webhook_limits`, and at most `MAX_RESPONSE_BYTES` of the answer are read.

The result is a plain `DeliveryResult` the outbox stores; `next_delay` turns it into the time of
the next attempt following the Standard Webhooks retry schedule.
"""

from __future__ import annotations

import logging
import random
import re
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal

import httpx

from auraserve.errors import BlockedAddress, InvalidParameter
from auraserve.observability import metrics
from auraserve.outbound import OutboundLimits, OutboundPolicy
from auraserve.outbound.transport import OutboundCall, read_capped
from auraserve.webhooks.settings import DEFAULT_SCHEDULE, check_webhook_url

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SCHEDULE",
    "MAX_ATTEMPTS",
    "MAX_RESPONSE_BYTES",
    "MAX_RETRY_AFTER",
    "USER_AGENT",
    "DeliveryResult",
    "Outcome",
    "deliver",
    "next_delay",
    "parse_retry_after",
    "webhook_limits",
]

Outcome = Literal["delivered", "retry", "gone"]

MAX_ATTEMPTS = len(DEFAULT_SCHEDULE)

MAX_RETRY_AFTER = 36000.0
"""A receiver's Retry-After is honoured up to our own longest gap (10 h), so one misconfigured
header cannot park a delivery for weeks."""

MAX_RESPONSE_BYTES = 64 * 1024
"""We read at most this much of a response: we only need the status, and a hostile receiver must
not be able to make us buffer an endless body."""

USER_AGENT = "auraserve-webhooks/1"
_ERROR_EXCERPT = 200

# Headers we set ourselves; a caller's value for them would desynchronise framing or pinning.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def webhook_limits(timeout: float) -> OutboundLimits:
    """A delivery attempt's limits: ``timeout`` for the whole attempt (DNS included) and each
    read or write, the default connect bound within it, `MAX_RESPONSE_BYTES` of answer."""
    return OutboundLimits.within(timeout, max_body_bytes=MAX_RESPONSE_BYTES)


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


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


async def deliver(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    policy: OutboundPolicy,
    limits: OutboundLimits,
    verify: ssl.SSLContext | bool | None = None,
) -> DeliveryResult:
    """POST ``body`` to ``url`` once and classify the outcome. Never raises for network trouble.

    Steps: re-validate the URL (a stored URL may predate a rule change); resolve and check the host
    with ``policy`` (all addresses must pass); connect to a checked address with SNI/certificate
    verification for the URL's host name; send; read at most ``limits.max_body_bytes`` of the
    reply.

    Args:
        headers: typically `signing.signed_headers(...)`; Host, Content-Length and Connection are
            set here and cannot be overridden.
        policy: the process's outbound policy (`Settings.outbound`), also deciding whether plain
            ``http://`` URLs are delivered to (development only).
        limits: typically `webhook_limits(settings.timeout)`.
        verify: an SSLContext to trust, ``True``/``None`` for the default trust store, or
            ``False`` to skip verification (development only).

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
        # Literal addresses are judged when resolving below, as a retry like any blocked one.
        normalised = check_webhook_url(url, policy, literal_addresses=False)
    except InvalidParameter as exc:
        return result("gone", error=f"invalid webhook URL: {exc.message}")

    request_headers = {"User-Agent": USER_AGENT}
    if not any(k.lower() == "content-type" for k in headers):
        request_headers["Content-Type"] = "application/json"
    for key, value in headers.items():
        if key.lower() not in _RESERVED_HEADERS:
            request_headers[key] = value

    call = OutboundCall(policy, limits, verify=verify)
    host = httpx.URL(normalised).raw_host.decode("ascii")
    try:
        async with call.stream(
            "POST", normalised, headers=request_headers, content=bytes(body)
        ) as response:
            received, _ = await read_capped(response, limits.max_body_bytes)
    except BlockedAddress as exc:
        logger.warning("webhook delivery blocked: %s", exc)
        return result("retry", error=f"blocked address: {exc}")
    except TimeoutError:
        return result(
            "retry",
            error=f"timed out after {limits.total:g} s",
            remote_address=call.remote_address,
        )
    except httpx.ConnectTimeout:
        return result("retry", error=f"connect timeout after {limits.connect:g} s")
    except httpx.TimeoutException as exc:
        kind = {
            httpx.ReadTimeout: "read timeout",
            httpx.WriteTimeout: "write timeout",
        }.get(type(exc), "timeout")
        return result(
            "retry",
            error=f"{kind} after {limits.total:g} s",
            remote_address=call.remote_address,
        )
    except httpx.ConnectError as exc:
        return result("retry", error=f"connection failed: {_describe(exc)}")
    except httpx.TransportError as exc:
        return result(
            "retry",
            error=f"{type(exc).__name__}: {_describe(exc)}",
            remote_address=call.remote_address,
        )
    except socket.gaierror as exc:
        return result("retry", error=f"DNS resolution failed for {host!r}: {_describe(exc)}")
    except OSError as exc:
        return result("retry", error=f"network error: {_describe(exc)}")
    except Exception as exc:  # a bug must not kill the outbox loop; log it loudly and retry
        logger.exception("unexpected error delivering webhook to %s", host)
        return result("retry", error=f"unexpected error: {type(exc).__name__}: {_describe(exc)}")

    status = response.status_code
    remote = call.remote_address
    if 200 <= status < 300:
        return result("delivered", status_code=status, remote_address=remote)
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 410:
        return result("gone", status_code=status, error="HTTP 410 Gone", remote_address=remote)
    if 300 <= status < 400:
        location = response.headers.get("location")
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
    excerpt = _excerpt(received)
    return result(
        "retry",
        status_code=status,
        error=f"HTTP {status}" + (f": {excerpt}" if excerpt else ""),
        retry_after=retry_after,
        remote_address=remote,
    )
