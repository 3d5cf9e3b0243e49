"""Webhook deliveries and image fetches go through one guard: the policy the settings built.

Each case runs both users of the guard — the Queue API's webhook URL check and a delivery
(`webhooks`), the `image` field's check and the worker's fetch (`api.image_field`,
`worker.inputs`) — against the same real origin on loopback, and expects the same verdict for
the same reason.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from auraserve.api.image_field import check_image_url
from auraserve.config import Settings, load_settings
from auraserve.core.request import build_request
from auraserve.errors import InvalidParameter, UnsupportedRequest
from auraserve.webhooks.delivery import DeliveryResult, deliver, webhook_limits
from auraserve.webhooks.settings import check_webhook_url
from auraserve.worker.inputs import fetch
from tests.outbound.conftest import PNG, FakeDNS, Origin

NAME = "shared.example.test"


def _settings(*allow: str) -> Settings:
    # Plain http, so that one loopback origin serves both users.
    return load_settings(webhook_allow_hosts=list(allow), webhook_allow_http=True)


def _submit_webhook(settings: Settings, url: str) -> str:
    """The reason the Queue API refuses ``url`` as X-Webhook-URL."""
    with pytest.raises(InvalidParameter) as info:
        check_webhook_url(url, settings.outbound)
    return _reason(info.value.message)


def _submit_image(settings: Settings, url: str) -> str:
    """The reason the API refuses ``url`` as the `image` field."""
    request = build_request(
        {"prompt": "p", "image": url},
        model=settings.default_preset,
        preset=settings.presets[settings.default_preset],
    )
    with pytest.raises(InvalidParameter) as info:
        check_image_url(request, settings, {})
    assert info.value.field == "image"
    return _reason(info.value.message)


def _reason(message: str) -> str:
    match = re.search(r"disallowed address: (.+?)\.?$", message)
    assert match is not None, message
    return match.group(1)


def _deliver(settings: Settings, url: str) -> DeliveryResult:
    webhooks = settings.webhooks  # what the outbox dispatcher is built from
    return asyncio.run(
        deliver(
            url,
            b'{"status":"succeeded"}',
            {},
            policy=webhooks.outbound,
            limits=webhook_limits(webhooks.timeout),
        )
    )


def _fetch_reason(settings: Settings, url: str) -> str:
    """The reason the worker's fetch refuses ``url``: at its URL check for a literal address,
    when resolving for a name."""
    with pytest.raises(UnsupportedRequest) as info:
        fetch(url, settings.outbound)  # what the worker passes (`Worker._generate_and_settle`)
    match = re.fullmatch(
        r"image: (?:the URL points to a disallowed address: (.+)\.|"
        r"unreachable \(blocked address: (.+)\))",
        info.value.message,
    )
    assert match is not None, info.value.message
    return match.group(1) or match.group(2)


def test_both_take_the_one_policy_the_settings_built() -> None:
    settings = _settings("127.0.0.1")
    assert settings.webhooks.outbound is settings.outbound
    assert settings.webhooks.outbound is settings.outbound  # built once, not per use


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.7", "private network (RFC 1918)"),
        ("169.254.169.254", "cloud metadata endpoint"),
        ("[::ffff:192.168.1.1]", "IPv4-mapped address embedding 192.168.1.1"),
    ],
)
def test_a_private_address_is_refused_by_both_with_the_same_rule(
    origin: Origin, host: str, reason: str
) -> None:
    settings = _settings()
    url = f"http://{host}:{origin.port}/image.png"
    webhook_reason = _submit_webhook(settings, url)
    assert webhook_reason.startswith(reason)
    assert _submit_image(settings, url) == webhook_reason

    # Had a stored URL slipped past (say, the allow list changed since), sending refuses too.
    delivered = _deliver(settings, url)
    assert delivered.outcome == "retry"
    assert (delivered.error or "").startswith("blocked address") and reason in delivered.error
    assert _fetch_reason(settings, url) == webhook_reason
    assert origin.requests == []


def test_a_name_resolving_to_a_private_address_is_refused_at_connect_time_by_both(
    origin: Origin, fake_dns: FakeDNS
) -> None:
    """Names pass the submit-time check (no DNS there); the guard stops them when resolved."""
    fake_dns.set(NAME, "127.0.0.1")  # where the origin listens: nothing must arrive
    settings = _settings()
    url = f"http://{NAME}:{origin.port}/image.png"
    assert check_webhook_url(url, settings.outbound) == url
    delivered = _deliver(settings, url)
    assert delivered.outcome == "retry" and delivered.remote_address is None
    assert f"host '{NAME}' resolves to 127.0.0.1, which is not allowed: loopback" in (
        delivered.error or ""
    )
    assert _fetch_reason(settings, url) == "loopback"
    assert origin.requests == []
    assert fake_dns.calls == [NAME, NAME]


def test_an_allowed_name_reaches_the_origin_pinned_for_both(
    origin: Origin, fake_dns: FakeDNS
) -> None:
    """Both connect to the checked address while naming the host: no resolver knows the name,
    so arriving at all proves the connection was pinned."""
    fake_dns.set(NAME, "127.0.0.1")
    settings = _settings("127.0.0.1")
    delivered = _deliver(settings, f"http://{NAME}:{origin.port}/hook")
    assert delivered.outcome == "delivered", delivered.error
    assert delivered.remote_address == "127.0.0.1"
    assert fetch(f"http://{NAME}:{origin.port}/image.png", settings.outbound) == PNG
    assert [(r.method, r.path) for r in origin.requests] == [
        ("POST", "/hook"),
        ("GET", "/image.png"),
    ]
    assert {r.headers["host"] for r in origin.requests} == {f"{NAME}:{origin.port}"}
    assert {r.headers["connection"] for r in origin.requests} == {"close"}


def test_redirects_are_not_followed_by_either(origin: Origin) -> None:
    settings = _settings("127.0.0.1")
    delivered = _deliver(settings, origin.url("/redirect"))
    assert delivered.outcome == "retry" and delivered.status_code == 302
    assert (delivered.error or "").startswith("redirect not followed")
    with pytest.raises(UnsupportedRequest, match="redirects are refused"):
        fetch(origin.url("/redirect"), settings.outbound)
    assert [r.path for r in origin.requests] == ["/redirect", "/redirect"]
