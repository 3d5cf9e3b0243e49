"""`core.status.iso`, the timestamp format of every status body, is the `datetime` formatting it
replaced, string for string (it caches the part up to the second)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from auraserve.core.status import iso


def _reference(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{int(ts * 1000) % 1000:03d}Z"
    )


def test_iso_matches_the_datetime_formatting() -> None:
    rng = random.Random(20260522)
    edges = [0.0, 1.0, 59.9999999, 12.9999995, 12.9999994, 12.9999996, 1779455852.9999995]
    edges += [1779455852.99999949, 1779455852.110, 1e10 + 0.5, 4102444799.9999999]
    randoms = [rng.uniform(0, 4.1e9) for _ in range(20_000)]
    # Just below a whole second: datetime rounds these up to the next second first.
    near_seconds = [
        rng.randint(0, 4 * 10**9) + rng.choice([0.9999995, 0.9999994, 0.9999996, 0.0000005])
        for _ in range(20_000)
    ]
    for ts in edges + randoms + near_seconds:
        assert iso(ts) == _reference(ts), ts


def test_iso_examples() -> None:
    assert iso(None) is None
    assert iso(1779455852.110) == "2026-05-22T13:17:32.110Z"
    assert iso(0.0) == "1970-01-01T00:00:00.000Z"
