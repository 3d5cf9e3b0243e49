"""The webhooks' own settings, built from the configuration by `Settings.webhooks`."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from auraserve.config import load_settings
from auraserve.webhooks.delivery import DEFAULT_SCHEDULE
from auraserve.webhooks.settings import WebhookSettings


def test_built_from_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AURASERVE_WEBHOOK_ALLOW_HOSTS", "127.0.0.1,localhost")
    monkeypatch.setenv("AURASERVE_WEBHOOK_SCHEDULE", "0,1,2")
    monkeypatch.setenv("AURASERVE_WEBHOOK_TIMEOUT_SECONDS", "3")
    monkeypatch.setenv("AURASERVE_WEBHOOK_SYNC_INTERVAL_SECONDS", "4")
    monkeypatch.setenv("AURASERVE_WEBHOOK_CONCURRENCY", "5")
    monkeypatch.setenv("AURASERVE_WEBHOOK_ALLOW_HTTP", "true")
    monkeypatch.setenv("AURASERVE_PUBLIC_URL", "https://img.example.com/")
    assert load_settings().webhooks == WebhookSettings(
        allow_hosts=("127.0.0.1", "localhost"),
        allow_http=True,
        schedule=(0.0, 1.0, 2.0),
        timeout=3.0,
        sync_interval=4.0,
        concurrency=5,
        public_url="https://img.example.com",
    )


def test_the_default_schedule_is_the_delivery_schedule() -> None:
    assert load_settings().webhooks.schedule == DEFAULT_SCHEDULE


def test_frozen_and_its_policy_follows_the_allow_list() -> None:
    settings = load_settings(webhook_allow_hosts=["127.0.0.1"]).webhooks
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.timeout = 1.0  # type: ignore[misc]
    loopback = ipaddress.ip_address("127.0.0.1")
    assert settings.policy().blocked_reason(loopback) is None
    assert load_settings().webhooks.policy().blocked_reason(loopback) == "loopback"
