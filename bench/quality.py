"""Image agreement for the benchmarks and the speed-mode tests: PSNR against a reference."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def psnr(a: Any, b: Any, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (PIL images or arrays of the same
    shape, 8-bit range by default); inf when they are identical.

    The acceptance bar for the speed modes: ≥ 35 dB against the unoptimised engine on the same
    seed for bf16 modes (differences invisible), ≥ 25 dB for fp8.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)
