"""The limits every outbound request runs under."""

from __future__ import annotations

import dataclasses

import pytest

from auraserve.outbound import DEFAULT_CONNECT_TIMEOUT, OutboundLimits


def test_within_bounds_the_connect_by_the_default_and_the_total() -> None:
    assert OutboundLimits.within(10, max_body_bytes=1) == OutboundLimits(
        total=10, connect=DEFAULT_CONNECT_TIMEOUT, max_body_bytes=1
    )
    assert OutboundLimits.within(2, max_body_bytes=1).connect == 2


@pytest.mark.parametrize(
    "fields",
    [
        {"total": 0, "connect": 1, "max_body_bytes": 1},
        {"total": 1, "connect": -1, "max_body_bytes": 1},
        {"total": 1, "connect": 1, "max_body_bytes": 0},
    ],
)
def test_nonsense_limits_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        OutboundLimits(**fields)  # type: ignore[arg-type]


def test_frozen() -> None:
    limits = OutboundLimits.within(1, max_body_bytes=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.total = 2  # type: ignore[misc]
