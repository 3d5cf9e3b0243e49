"""bench/engine.py end to end on the CPU with the tiny model: it runs, and our engine matches
diffusers on the configuration it times (euler/normal, fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.loader import bench_module


def test_tiny_cpu_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "engine.json"
    bench_module("engine").main(
        ["--size", "512", "--steps", "1", "--repeats", "1", "--batch", "2", "--out", str(out)]
    )
    report = json.loads(out.read_text())
    assert report["config"]["model"] == "tiny" and report["config"]["size"] == 512
    names = [result["name"] for result in report["results"]]
    assert len(names) == 4 and any(name.startswith("diffusers") for name in names)
    assert report["max_abs_pixel_diff"] <= 1
    assert report["ratio_auraserve_over_diffusers"] > 0
    assert "max |pixel difference| auraserve vs diffusers" in capsys.readouterr().out
