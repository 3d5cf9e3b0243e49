"""The webhooks' own settings, built from the configuration by `Settings.webhooks`."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from auraserve.config import load_settings
from auraserve.errors import InvalidParameter
from auraserve.outbound import OutboundPolicy
from auraserve.webhooks.delivery import DEFAULT_SCHEDULE
from auraserve.webhooks.settings import WebhookSettings, check_webhook_url


def test_built_from_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AURASERVE_WEBHOOK_ALLOW_HOSTS", "127.0.0.1,localhost")
    monkeypatch.setenv("AURASERVE_WEBHOOK_SCHEDULE", "0,1,2")
    monkeypatch.setenv("AURASERVE_WEBHOOK_TIMEOUT_SECONDS", "3")
    monkeypatch.setenv("AURASERVE_WEBHOOK_SYNC_INTERVAL_SECONDS", "4")
    monkeypatch.setenv("AURASERVE_WEBHOOK_CONCURRENCY", "5")
    monkeypatch.setenv("AURASERVE_WEBHOOK_ALLOW_HTTP", "true")
    monkeypatch.setenv("AURASERVE_PUBLIC_URL", "https://img.example.com/")
    assert load_settings().webhooks == WebhookSettings(
        outbound=OutboundPolicy.from_allow_list(["127.0.0.1", "localhost"], allow_http=True),
        schedule=(0.0, 1.0, 2.0),
        timeout=3.0,
        sync_interval=4.0,
        concurrency=5,
        public_url="https://img.example.com",
    )


def test_the_default_schedule_is_the_delivery_schedule() -> None:
    assert load_settings().webhooks.schedule == DEFAULT_SCHEDULE


def test_frozen_and_its_policy_is_the_process_policy() -> None:
    config = load_settings(webhook_allow_hosts=["127.0.0.1"])
    settings = config.webhooks
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.timeout = 1.0  # type: ignore[misc]
    # Not a policy of its own: the one the settings built, which the image fetches use too.
    assert settings.outbound is config.outbound
    loopback = ipaddress.ip_address("127.0.0.1")
    assert settings.outbound.addresses.blocked_reason(loopback) is None
    assert load_settings().webhooks.outbound.addresses.blocked_reason(loopback) == "loopback"


def test_webhook_url_errors_name_the_header() -> None:
    with pytest.raises(InvalidParameter) as info:
        check_webhook_url("https://127.0.0.1/hook", OutboundPolicy())
    assert info.value.field == "X-Webhook-URL"
    assert info.value.message == ("The webhook URL points to a disallowed address: loopback.")
    # Left to the delivery's resolve-and-check (a retry there, not a refusal of the URL).
    assert check_webhook_url("https://127.0.0.1/hook", OutboundPolicy(), literal_addresses=False)
