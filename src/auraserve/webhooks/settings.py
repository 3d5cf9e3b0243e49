"""What the webhook side needs to know from the configuration, and nothing else.

`auraserve.config.Settings.webhooks` builds it from the `AURASERVE_WEBHOOK_*` settings (where
defaults and validation live); the webhooks take it as an argument instead of importing the
configuration, which sits above them.
"""

from __future__ import annotations

from dataclasses import dataclass

from auraserve.webhooks.ssrf import AddressPolicy

__all__ = ["DEFAULT_SCHEDULE", "WebhookSettings"]

#: Delay before attempt n (0-based), in seconds, defined here once: immediately, 5 s, 5 min,
#: 30 min, 2 h, 5 h, 10 h, 10 h — the Standard Webhooks / Svix schedule, about 27.6 h in all.
DEFAULT_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookSettings:
    """The webhook settings of one process.

    Attributes:
        allow_hosts: hosts or networks deliveries may reach although they are loopback or
            private (development and tests); see `AddressPolicy`.
        allow_http: accept plain ``http://`` webhook URLs (development only).
        schedule: delay before attempt *n*, in seconds; `DEFAULT_SCHEDULE` unless configured.
        timeout: bound on one delivery attempt, in seconds.
        sync_interval: sync mode sends progress at most this often, in seconds.
        concurrency: deliveries in flight at once per dispatcher.
        public_url: base of the absolute URLs in the status bodies the callbacks carry.
    """

    allow_hosts: tuple[str, ...]
    allow_http: bool
    schedule: tuple[float, ...]
    timeout: float
    sync_interval: float
    concurrency: int
    public_url: str

    def policy(self) -> AddressPolicy:
        """The address policy deliveries and submitted URLs are checked against."""
        return AddressPolicy(self.allow_hosts)
