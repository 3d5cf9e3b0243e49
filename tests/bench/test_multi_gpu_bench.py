"""bench/gpu.py --multi-gpu (bench/multi_gpu.py) on the CPU: with a faked list of two GPUs the
whole stage runs with the tiny model (one pinned process per "GPU", started together, then the
two-rank --parallel modes on gloo); with one GPU, or none, it is skipped and says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.bench.test_gpu_bench import ROOT, SCRIPT, gpu_bench  # noqa: F401 (a fixture)

STAGE_ONLY = ["--tiny", "--device", "cpu", "--modes", "", "--memory-modes", "", "--multi-gpu"]


def _run(tmp_path: Path, gpus: str | None) -> tuple[dict[str, Any], str]:
    env = dict(os.environ)
    env.pop("AURASERVE_TEST_GPUS", None)
    if gpus is not None:
        env["AURASERVE_TEST_GPUS"] = gpus
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *STAGE_ONLY, "--out", str(out), "--md", str(md)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


def test_two_gpus_one_pinned_process_each(tmp_path: Path, gpu_bench: ModuleType) -> None:  # noqa: F811
    report, markdown = _run(tmp_path, "0,1")
    stage = report["multi_gpu"]
    assert stage["gpus_available"] == 2
    one, two = stage["workers"]
    # Each process reports the CUDA_VISIBLE_DEVICES it was started with.
    assert one["pinned_to"] == ["0"] and two["pinned_to"] == ["0", "1"]
    assert one["scaling"] == 1.0 and two["scaling"] > 0
    assert all(s > 0 for s in two["s_per_image"]) and two["images_per_s"] > 0
    # The two-rank modes run (gloo on the CPU here), the four-rank ones say why not.
    cfg, ulysses, both, four = stage["parallel"]
    assert [cfg["mode"], ulysses["mode"]] == ["cfg=2", "ulysses=2"]
    for row in (cfg, ulysses):
        assert row["gpus"] == 2 and row["s_per_image"] > 0 and row["speedup"] > 0, row
    for row, mode in ((both, "cfg=2,ulysses=2"), (four, "ulysses=4")):
        assert row == {"mode": mode, "skipped": "needs 4 GPUs (one per rank); this machine has 2"}
    assert "| 2 | " in markdown and "scaling vs 1 GPU" in markdown
    assert "`--parallel ulysses=2` on 2 GPUs: " in markdown
    assert "`--parallel ulysses=4`: skipped, needs 4 GPUs" in markdown

    # --render keeps the stage; a later run without it does not erase it.
    later = dict(report, multi_gpu={"skipped": "one GPU"})
    second = tmp_path / "later.json"
    second.write_text(json.dumps(later))
    merged = gpu_bench.main(["--render", str(tmp_path / "r.json"), str(second)])
    assert merged["multi_gpu"]["workers"] == stage["workers"]


@pytest.mark.parametrize(
    ("gpus", "reason"),
    [
        ("0", "needs two GPUs or more; this machine has 1"),
        (None, "needs two CUDA GPUs or more (device is cpu)"),
    ],
)
def test_fewer_than_two_gpus_skip_the_stage_and_say_so(
    tmp_path: Path, gpus: str | None, reason: str
) -> None:
    report, markdown = _run(tmp_path, gpus)
    assert reason in report["multi_gpu"]["skipped"]
    assert f"Multi-GPU: the multi-GPU stage {reason}" in markdown


def test_gpu_counts(gpu_bench: ModuleType) -> None:  # noqa: F811
    counts = gpu_bench._multi_gpu.gpu_counts
    assert counts(2) == [1, 2] and counts(3) == [1, 2, 3] and counts(8) == [1, 2, 4, 8]
    assert counts(6) == [1, 2, 4, 6]
