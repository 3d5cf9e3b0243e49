"""What the webhook side needs to know from the configuration, and nothing else.

`auraserve.config.Settings.webhooks` builds it from the `AURASERVE_WEBHOOK_*` settings (where
defaults and validation live); the webhooks take it as an argument instead of importing the
configuration, which sits above them.
"""

from __future__ import annotations

from dataclasses import dataclass

from auraserve.outbound import OutboundPolicy

__all__ = ["DEFAULT_SCHEDULE", "URL_FIELD", "WebhookSettings", "check_webhook_url"]

#: Delay before attempt n (0-based), in seconds, defined here once: immediately, 5 s, 5 min,
#: 30 min, 2 h, 5 h, 10 h, 10 h — the Standard Webhooks / Svix schedule, about 27.6 h in all.
DEFAULT_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)

URL_FIELD = "X-Webhook-URL"
"""The request header a webhook URL comes from; errors name it so clients know what to fix."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookSettings:
    """The webhook settings of one process.

    Attributes:
        outbound: the process's outbound policy (`Settings.outbound`, built once): which
            addresses deliveries may reach and whether plain ``http://`` is accepted.
        schedule: delay before attempt *n*, in seconds; `DEFAULT_SCHEDULE` unless configured.
        timeout: bound on one delivery attempt, in seconds.
        sync_interval: sync mode sends progress at most this often, in seconds.
        concurrency: deliveries in flight at once per dispatcher.
        public_url: base of the absolute URLs in the status bodies the callbacks carry.
    """

    outbound: OutboundPolicy
    schedule: tuple[float, ...]
    timeout: float
    sync_interval: float
    concurrency: int
    public_url: str


def check_webhook_url(url: str, policy: OutboundPolicy, *, literal_addresses: bool = True) -> str:
    """A webhook URL checked under ``policy`` (`OutboundPolicy.check_url`), its errors naming
    the X-Webhook-URL header; the normalised URL to store and deliver to."""
    return policy.check_url(
        url, field=URL_FIELD, noun="The webhook URL", literal_addresses=literal_addresses
    )
