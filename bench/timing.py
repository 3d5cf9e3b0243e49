"""Timing shared by the micro-benchmarks (bench/checkpoint.py, bench/preview.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed_ms(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) milliseconds over ``repeats`` calls after one warm-up call. The min is
    the cost on a quiet host; the median includes what other processes took from us."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), min(times)
