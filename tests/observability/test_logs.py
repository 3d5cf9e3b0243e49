"""JSON logs (AURASERVE_LOG_FORMAT=json): one object per line, with the request id, from a real
`auraserve serve` process; and a store outage logged once, not once per retry."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from auraserve.config import Settings
from auraserve.errors import StoreUnavailable
from auraserve.observability.logs import REQUEST_ID, JsonFormatter, OutageLog
from tests.conftest import free_port


def test_a_json_line_carries_the_request_id_and_the_traceback() -> None:
    record = logging.LogRecord(
        "auraserve.x", logging.ERROR, __file__, 1, "failed %s", ("it",), None
    )
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record.exc_info = sys.exc_info()
    token = REQUEST_ID.set("req-1")
    try:
        line = JsonFormatter().format(record)
    finally:
        REQUEST_ID.reset(token)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "auraserve.x"
    assert entry["message"] == "failed it"
    assert entry["request_id"] == "req-1"
    assert entry["exc_info"].startswith("Traceback") and "ValueError: boom" in entry["exc_info"]
    assert entry["time"].endswith("Z")


def test_an_outage_is_logged_once_and_its_end_once() -> None:
    logger = logging.getLogger("auraserve.test_outage")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        outage = OutageLog(logger, "worker")
        for _ in range(20):  # a loop retrying every second for 20 s
            outage.failed(StoreUnavailable())
        outage.recovered()
        outage.recovered()
    finally:
        logger.removeHandler(handler)
    assert [r.levelno for r in records] == [logging.ERROR, logging.WARNING]
    assert "database unavailable" in records[0].getMessage()
    assert "20 failed attempts" in records[1].getMessage()


def test_serve_logs_json_lines_with_request_ids(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "AURASERVE_LOG_FORMAT": "json",
        "AURASERVE_DATA_DIR": str(settings.data_dir),
        "AURASERVE_WORKERS": "0",
    }
    if settings.database_url:
        env["AURASERVE_DATABASE_URL"] = settings.database_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "auraserve", "-v", "serve", "--port", str(port), "--access-log"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                resp = httpx.get(
                    f"http://127.0.0.1:{port}/healthz", headers={"X-Request-Id": "probe-42"}
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
                time.sleep(0.1)
        assert resp.headers["x-request-id"] == "probe-42"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert entries, "no log lines"
    access = [e for e in entries if e["logger"] == "uvicorn.access"]
    assert access and access[-1]["request_id"] == "probe-42", entries
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
