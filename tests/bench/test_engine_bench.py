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
    assert len(names) == 8 and any(name.startswith("diffusers") for name in names)
    # LoRA beside plain text-to-image: one adapter, a hot-swap each run, plain on that engine.
    assert "auraserve + LoRA (rank 16)" in names
    assert "auraserve + LoRA, hot-swap A↔B each run" in names
    assert report["config"]["lora_swaps_timed"] >= 1
    # Image-to-image beside text-to-image; strength 0.6 of 1 step runs that 1 step.
    assert "auraserve img2img (strength 0.6)" in names
    assert report["config"]["img2img_steps_run"] == 1
    assert report["max_abs_pixel_diff"] <= 1
    assert report["ratio_auraserve_over_diffusers"] > 0
    assert "max |pixel difference| auraserve vs diffusers" in capsys.readouterr().out
