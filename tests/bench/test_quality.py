"""bench/quality.py: PSNR, the measure the speed modes are held to."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from tests.bench.loader import bench_module

psnr = bench_module("quality").psnr


def test_psnr() -> None:
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    assert psnr(a, b) == math.inf
    b[0, 0, 0] = 255  # mse = 255² / 48
    assert math.isclose(psnr(a, b), 10 * math.log10(48))
    assert psnr(Image.fromarray(a), Image.fromarray(b)) == psnr(a, b)
    with pytest.raises(ValueError, match="shape"):
        psnr(a, np.zeros((4, 5, 3)))
