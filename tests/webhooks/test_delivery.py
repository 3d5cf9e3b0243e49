"""Deliveries over real TLS to real loopback receivers; nothing on the network path is mocked.

The only stand-in is DNS for made-up names (`fake_dns`), because the test environment has no DNS
and because controlling the answers is exactly what the pinning tests need.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
import time
from pathlib import Path

import pytest

from auraserve.outbound import OutboundLimits, OutboundPolicy
from auraserve.webhooks.delivery import (
    DEFAULT_SCHEDULE,
    MAX_ATTEMPTS,
    MAX_RESPONSE_BYTES,
    MAX_RETRY_AFTER,
    DeliveryResult,
    deliver,
    next_delay,
    parse_retry_after,
    webhook_limits,
)
from auraserve.webhooks.signing import signed_headers
from tests.outbound.conftest import FakeDNS
from tests.webhooks.conftest import NAMED_HOST, Receiver

DEV_POLICY = OutboundPolicy.from_allow_list(["127.0.0.1", "::1", "localhost"])
BODY = json.dumps({"id": "job_1", "status": "succeeded"}).encode()


def _headers(secret: str, msg_id: str = "msg_1") -> dict[str, str]:
    return signed_headers(secret, msg_id, BODY)


async def _send(
    url: str,
    secret: str,
    context: ssl.SSLContext | bool | None,
    *,
    policy: OutboundPolicy = DEV_POLICY,
    timeout: float = 5.0,
) -> DeliveryResult:
    return await deliver(
        url, BODY, _headers(secret), policy=policy, limits=webhook_limits(timeout), verify=context
    )


# -- outcomes ----------------------------------------------------------------------------------


async def test_delivered_and_signature_verifies(
    receiver: Receiver, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    url = f"https://localhost:{receiver.port}/hook?job=1"
    result = await _send(url, webhook_secret, trusting_context)
    assert result.outcome == "delivered" and result.delivered
    assert result.status_code == 200
    assert result.error is None and result.retry_after is None
    assert result.remote_address == "127.0.0.1"
    assert 0 < result.duration_ms < 5000
    [seen] = receiver.requests
    assert seen.path == "/hook"
    assert seen.verified, "the receiver's standardwebhooks check must pass"
    assert seen.body == BODY
    assert seen.headers["host"] == f"localhost:{receiver.port}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["webhook-id"] == "msg_1"
    assert seen.headers["content-length"] == str(len(BODY))


async def test_receiver_rejecting_signature_means_retry(
    receiver: Receiver, trusting_context: ssl.SSLContext
) -> None:
    from auraserve.webhooks.signing import new_secret

    result = await _send(f"https://127.0.0.1:{receiver.port}/hook", new_secret(), trusting_context)
    assert result.outcome == "retry"
    assert result.status_code == 401
    assert result.error is not None and result.error.startswith("HTTP 401")
    assert receiver.requests[0].verified is False


async def test_default_trust_honours_ssl_cert_file(
    receiver: Receiver,
    webhook_secret: str,
    ca_pem_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"https://localhost:{receiver.port}/hook"
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem_file))
    result = await _send(url, webhook_secret, None)
    assert result.outcome == "delivered", result.error
    assert (await _send(url, webhook_secret, True)).outcome == "delivered"

    # Without it the test CA is unknown, so the same delivery must fail verification.
    monkeypatch.delenv("SSL_CERT_FILE")
    result = await _send(url, webhook_secret, None)
    assert result.outcome == "retry"
    assert result.status_code is None
    assert "CERTIFICATE_VERIFY_FAILED" in (result.error or "")
    assert len(receiver.requests) == 2  # only the two trusted deliveries arrived


async def test_gone(
    receiver: Receiver, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    result = await _send(
        f"https://localhost:{receiver.port}/gone", webhook_secret, trusting_context
    )
    assert result.outcome == "gone"
    assert result.status_code == 410


async def test_503_with_retry_after_seconds(
    receiver: Receiver, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    result = await _send(
        f"https://localhost:{receiver.port}/busy", webhook_secret, trusting_context
    )
    assert result.outcome == "retry"
    assert result.status_code == 503
    assert result.retry_after == 7.0
    assert result.error is not None and result.error.startswith("HTTP 503")
    # The schedule says ~5 s for the second attempt; the receiver asked for 7.
    assert next_delay(1, retry_after=result.retry_after) == 7.0


async def test_429_with_retry_after_date(
    receiver: Receiver, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    result = await _send(
        f"https://localhost:{receiver.port}/ratelimited", webhook_secret, trusting_context
    )
    assert result.outcome == "retry"
    assert result.status_code == 429
    assert result.retry_after is not None and 100 < result.retry_after <= 120


async def test_other_4xx_is_retry(
    receiver: Receiver, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    result = await _send(
        f"https://localhost:{receiver.port}/nope", webhook_secret, trusting_context
    )
    assert (result.outcome, result.status_code) == ("retry", 404)


async def test_redirect_is_not_followed(
    receiver: Receiver, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    result = await _send(
        f"https://localhost:{receiver.port}/redirect", webhook_secret, trusting_context
    )
    assert result.outcome == "retry"
    assert result.status_code == 307
    assert result.error is not None and result.error.startswith("redirect not followed")
    assert receiver.paths() == ["/redirect"], "the redirect target must not be contacted"


async def test_timeout_is_bounded(
    receiver: Receiver, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    started = time.monotonic()
    result = await _send(
        f"https://localhost:{receiver.port}/slow", webhook_secret, trusting_context, timeout=0.5
    )
    elapsed = time.monotonic() - started
    assert result.outcome == "retry"
    assert result.status_code is None
    assert "time" in (result.error or "")
    assert elapsed < 2.0
    assert result.duration_ms < 2000


async def test_response_body_read_is_capped(
    receiver: Receiver, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    """A 200 with a never-ending body: we stop at the cap instead of reading until timeout."""
    receiver.endless_stopped_after = None
    started = time.monotonic()
    result = await _send(
        f"https://localhost:{receiver.port}/endless", webhook_secret, trusting_context, timeout=5.0
    )
    assert result.outcome == "delivered"
    assert time.monotonic() - started < 3.0
    # ...and the connection was closed, so the receiver noticed and stopped sending.
    deadline = time.monotonic() + 3.0
    while receiver.endless_stopped_after is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert receiver.endless_stopped_after is not None


async def test_connection_refused_is_retry(
    trusting_context: ssl.SSLContext, webhook_secret: str
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await _send(f"https://127.0.0.1:{port}/hook", webhook_secret, trusting_context)
    assert result.outcome == "retry"
    assert result.status_code is None
    assert (result.error or "").startswith("connection failed")


async def test_invalid_url_is_gone(webhook_secret: str, trusting_context: ssl.SSLContext) -> None:
    for url in ("http://localhost/hook", "https://user:pw@localhost/hook", "https://2130706433/"):
        result = await _send(url, webhook_secret, trusting_context)
        assert result.outcome == "gone"
        assert (result.error or "").startswith("invalid webhook URL")


async def test_dns_failure_is_retry(
    fake_dns: FakeDNS, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    fake_dns.set("nxdomain.example.test")
    result = await _send("https://nxdomain.example.test/hook", webhook_secret, trusting_context)
    assert result.outcome == "retry"
    assert "DNS resolution failed" in (result.error or "")


# -- address policy ----------------------------------------------------------------------------


async def test_loopback_blocked_before_any_connection(
    webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    """With the default policy, neither 127.0.0.1 nor localhost gets so much as a TCP SYN."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):
            result = await _send(
                f"https://{host}:{port}/hook",
                webhook_secret,
                trusting_context,
                policy=OutboundPolicy(),
            )
            assert result.outcome == "retry"
            assert (result.error or "").startswith("blocked address")
            assert "loopback" in (result.error or "")
            assert result.remote_address is None
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected


async def test_allowed_when_in_allow_list(
    receiver: Receiver, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    by_address = OutboundPolicy.from_allow_list(["127.0.0.1"])
    result = await _send(
        f"https://127.0.0.1:{receiver.port}/hook",
        webhook_secret,
        trusting_context,
        policy=by_address,
    )
    assert result.outcome == "delivered", result.error
    by_name = OutboundPolicy.from_allow_list(["localhost"])
    result = await _send(
        f"https://localhost:{receiver.port}/hook", webhook_secret, trusting_context, policy=by_name
    )
    assert result.outcome == "delivered", result.error
    assert len(receiver.requests) == 2


async def test_certificate_for_wrong_host_fails(
    named_receiver: Receiver, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    """The named receiver's certificate is for hooks.example.test only."""
    for host in ("localhost", "127.0.0.1"):
        result = await _send(
            f"https://{host}:{named_receiver.port}/hook", webhook_secret, trusting_context
        )
        assert result.outcome == "retry"
        assert result.status_code is None
        assert "CERTIFICATE_VERIFY_FAILED" in (result.error or "")
        assert "mismatch" in (result.error or "").lower()
    assert named_receiver.requests == []


async def test_pinned_connection_uses_checked_ip_and_verifies_name(
    named_receiver: Receiver,
    fake_dns: FakeDNS,
    webhook_secret: str,
    trusting_context: ssl.SSLContext,
) -> None:
    """TCP goes to the checked IP; TLS (SNI + certificate check) uses the URL's host name.

    The name resolves to 127.0.0.1 on the first lookup and to the metadata address on any later
    one (DNS rebinding). Delivery succeeding proves: the connection was made to the first, checked
    answer without a second lookup; and the certificate, valid *only* for hooks.example.test (no
    IP SANs), was verified against the name rather than the address dialled.
    """
    answers = iter([["127.0.0.1"]])
    fake_dns.set_dynamic(NAMED_HOST, lambda: next(answers, ["169.254.169.254"]))
    url = f"https://{NAMED_HOST}:{named_receiver.port}/hook"
    result = await _send(
        url, webhook_secret, trusting_context, policy=OutboundPolicy.from_allow_list(["127.0.0.1"])
    )
    assert result.outcome == "delivered", result.error
    assert result.remote_address == "127.0.0.1"
    assert fake_dns.calls == [NAMED_HOST], "the name must be resolved exactly once"
    [seen] = named_receiver.requests
    assert seen.verified
    assert seen.client_ip == "127.0.0.1"
    assert seen.headers["host"] == f"{NAMED_HOST}:{named_receiver.port}"

    # Had the check seen the rebinding answer, nothing would have been sent at all.
    result = await _send(
        url, webhook_secret, trusting_context, policy=OutboundPolicy.from_allow_list(["127.0.0.1"])
    )
    assert result.outcome == "retry" and "metadata" in (result.error or "")
    assert len(named_receiver.requests) == 1


async def test_pinning_falls_back_across_checked_addresses(
    named_receiver: Receiver,
    fake_dns: FakeDNS,
    webhook_secret: str,
    trusting_context: ssl.SSLContext,
) -> None:
    """A checked address that refuses connections is skipped for the next checked one."""
    fake_dns.set(NAMED_HOST, "127.0.0.2", "127.0.0.1")  # nothing listens on 127.0.0.2
    result = await _send(
        f"https://{NAMED_HOST}:{named_receiver.port}/hook",
        webhook_secret,
        trusting_context,
        policy=OutboundPolicy.from_allow_list(["127.0.0.0/8"]),
    )
    assert result.outcome == "delivered", result.error
    assert result.remote_address == "127.0.0.1"


async def test_mixed_public_private_answer_never_connects(
    fake_dns: FakeDNS, webhook_secret: str, trusting_context: ssl.SSLContext
) -> None:
    fake_dns.set("mixed.example.test", "93.184.215.14", "10.0.0.5")
    result = await _send(
        "https://mixed.example.test/hook", webhook_secret, trusting_context, policy=OutboundPolicy()
    )
    assert result.outcome == "retry"
    assert "10.0.0.5" in (result.error or "")
    assert result.remote_address is None


# -- schedule ----------------------------------------------------------------------------------


def test_default_schedule() -> None:
    assert DEFAULT_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert MAX_ATTEMPTS == 8
    exact = [next_delay(i, jitter=0) for i in range(MAX_ATTEMPTS)]
    assert exact == [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
    assert next_delay(MAX_ATTEMPTS) is None
    assert next_delay(100) is None
    with pytest.raises(ValueError, match="attempt must be >= 0"):
        next_delay(-1)


def test_jitter_is_bounded_and_varies() -> None:
    rng = random.Random(1234)
    for attempt, base in enumerate(DEFAULT_SCHEDULE):
        values = {next_delay(attempt, rng=rng) for _ in range(50)}
        assert all(v is not None and base * 0.9 <= v <= base * 1.1 for v in values)
        if base:
            assert len(values) > 40
    assert next_delay(0, rng=rng) == 0  # the first attempt is immediate, never jittered


def test_retry_after_is_a_capped_lower_bound() -> None:
    assert next_delay(1, jitter=0, retry_after=60) == 60
    assert next_delay(3, jitter=0, retry_after=60) == 1800  # schedule already longer
    assert next_delay(1, jitter=0, retry_after=10**9) == MAX_RETRY_AFTER
    assert next_delay(1, jitter=0, retry_after=10**9, max_retry_after=600) == 600
    assert next_delay(MAX_ATTEMPTS, retry_after=60) is None  # never adds attempts
    assert next_delay(1, jitter=0, retry_after=0) == 5


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1000.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # in the past
        ("", None),
        (None, None),
        ("soon", None),
        ("-5", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = 1445412480.0 - 1000.0  # 2015-10-21 07:28:00 GMT minus 1000 s
    assert parse_retry_after(value, now=now) == expected


async def test_verify_false_skips_certificate_checks(
    named_receiver: Receiver, webhook_secret: str
) -> None:
    """Development escape hatch: the wrong-name certificate is accepted when verify=False."""
    result = await _send(f"https://localhost:{named_receiver.port}/hook", webhook_secret, False)
    assert result.outcome == "delivered", result.error


async def test_plain_http_only_with_allow_http(webhook_secret: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook"
    limits = webhook_limits(2)
    refused = await deliver(url, BODY, _headers(webhook_secret), policy=DEV_POLICY, limits=limits)
    assert refused.outcome == "gone" and "https" in (refused.error or "")
    dev_http = OutboundPolicy(addresses=DEV_POLICY.addresses, allow_http=True)
    attempted = await deliver(url, BODY, _headers(webhook_secret), policy=dev_http, limits=limits)
    assert attempted.outcome == "retry"
    assert (attempted.error or "").startswith("connection failed")


def test_webhook_limits() -> None:
    assert webhook_limits(10) == OutboundLimits(
        total=10, connect=5, max_body_bytes=MAX_RESPONSE_BYTES
    )
    assert webhook_limits(2).connect == 2  # the connect bound never outlasts the attempt
