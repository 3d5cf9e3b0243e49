"""bench/scaleout.py end to end for a couple of seconds: a real `serve --api-processes 2`, the
Python load generator in other processes, and the wake-up latencies, on this run's backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.loader import bench_module
from tests.conftest import BACKEND


def test_scaleout_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scaleout.json"
    bench_module("scaleout").main(
        [
            "--backend", BACKEND,
            "--processes", "2",
            "--duration", "1",
            "--connections", "4",
            "--client", "python",
            "--wakeup-jobs", "2",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["backend"] == BACKEND and result["api_processes"] == 2
    for phase in ("submit", "poll"):
        (row,) = result["throughput"][phase]
        assert row["rate"] > 0 and row["non_2xx"] == 0, row
        # The supervisor and both API children were measured.
        assert set(row["server_cpu"]) == {"supervisor", "api-1", "api-2"}
    assert result["throughput"]["poll_queue_position"] is not None
    wakeup = result["wakeup"]
    for name in ("submit_to_claim_ms", "completion_to_sync_response_ms"):
        assert 0 <= wakeup[name]["median"] <= wakeup[name]["max"]
    assert "| poll |" in capsys.readouterr().out
