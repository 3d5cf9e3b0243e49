"""How long and how much one outbound request may take.

Every outbound request runs under the same mechanics (`outbound.transport`): one bound on the
whole exchange, DNS included; one on each TCP+TLS connect; a cap on the response body read. Each
use has its own values: a webhook delivery reads a few bytes of an answer it barely needs, an
image fetch reads a whole image.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "OutboundLimits"]

DEFAULT_CONNECT_TIMEOUT = 5.0
"""Connect bound when a use gives none: a receiver that has not accepted within 5 s is down."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundLimits:
    """The limits of one kind of outbound request.

    Attributes:
        total: seconds for the whole exchange (resolve, connect, send, read), and the bound on
            each single read or write.
        connect: seconds for each TCP+TLS connect (each checked address in turn).
        max_body_bytes: at most this much of a response body is read.
    """

    total: float
    connect: float
    max_body_bytes: int

    def __post_init__(self) -> None:
        if self.total <= 0 or self.connect <= 0:
            raise ValueError("outbound timeouts must be > 0 seconds")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be > 0")

    @classmethod
    def within(cls, total: float, *, max_body_bytes: int) -> OutboundLimits:
        """Limits whose connect bound is the default one, never longer than ``total``."""
        return cls(
            total=total,
            connect=min(DEFAULT_CONNECT_TIMEOUT, total),
            max_body_bytes=max_body_bytes,
        )
