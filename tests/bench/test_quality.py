"""bench/quality.py: PSNR, the measure the speed modes are held to."""

from __future__ import annotations

import json
import math
from pathlib import Path

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


def test_ssim() -> None:
    ssim = bench_module("quality").ssim
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    assert 0.5 < ssim(a, noisy) < 0.99
    assert ssim(a, noisy) > ssim(a, 255 - a)
    with pytest.raises(ValueError, match="shape"):
        ssim(a, a[:16])


def test_compare_two_modes_on_the_tiny_model(tmp_path: Path) -> None:
    """The CI run: exact against itself is identical with nothing skipped; a forced-skip
    step cache (a threshold only random weights need) reports its skips and agreement."""
    quality = bench_module("quality")
    same = quality.main(
        [
            "--tiny",
            "--a",
            "default",
            "--b",
            "attention",
            "--prompts",
            "1",
            "--steps",
            "4",
            "--size",
            "64",
        ]
    )
    assert same["rows"][0]["psnr_db"] == "inf" and same["rows"][0]["ssim"] == pytest.approx(1.0)
    assert same["skip_ratio_b"] == 0.0
    out = tmp_path / "q.json"
    spec = "step_cache=fbcache,cache_threshold=2,cache_warmup=1"
    report = quality.main(
        ["--tiny", "--b", spec, "--prompts", "2", "--steps", "6", "--size", "64", "--out", str(out)]
    )
    assert json.loads(out.read_text())["b"] == spec
    assert 0.0 < report["skip_ratio_b"] < 1.0 and report["skip_ratio_a"] == 0.0
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        assert row["psnr_db"] != "inf" and row["psnr_db"] > 10
        assert 0.0 < row["ssim"] < 1.0
    assert "random weights" in report["note"]
