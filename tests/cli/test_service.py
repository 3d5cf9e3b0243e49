"""`serve` and `worker` as a first-time operator meets them: the start-up lines name the
playground, the docs and the key; the store and the S3 bucket are checked before the model
loads, with the same one-line cause that `keys list` gives."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli.test_cli import run_cli
from tests.conftest import free_port
from tests.s3_server import S3Server, start_s3_server


def _serve_until_listening(
    env: dict[str, str], *extra: str
) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "auraserve", "serve", "--model", "tiny", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "listening on" in line or line.startswith("{"):
            break
    return proc, lines


def _wait_up(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/health")
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_first_start_names_the_playground_the_docs_and_the_key(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, AURASERVE_DATA_DIR=str(tmp_path / "d"), AURASERVE_PORT=str(port))
    env.pop("AURASERVE_DATABASE_URL", None)
    proc, lines = _serve_until_listening(env)
    base = f"http://127.0.0.1:{port}"
    try:
        text = "".join(lines)
        assert re.search(r"aura_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", text), text
        assert f"playground  {base}/playground" in text
        assert f"API docs    {base}/docs" in text
        _wait_up(base)
        assert httpx.get(f"{base}/playground").status_code == 200
        assert httpx.get(f"{base}/docs").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    # Later starts, as JSON: the same URLs, and no key (it was shown once).
    proc, lines = _serve_until_listening(env, "--json")
    try:
        record = json.loads(lines[-1])
        assert record["event"] == "listening"
        assert record["playground"] == f"{base}/playground" and record["docs"] == f"{base}/docs"
        assert "api_key" not in record and "tiny" not in record["models"]
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_unreachable_store_fails_before_the_model_loads(tmp_path: Path, command: str) -> None:
    env = {
        "AURASERVE_DATA_DIR": str(tmp_path),
        "AURASERVE_DATABASE_URL": f"postgresql://auraserve@127.0.0.1:{free_port()}/nowhere",
    }
    keys_list = run_cli("keys", "list", env=env)
    started = time.monotonic()
    result = run_cli(command, "--model", "tiny", env=env)
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()  # no "loading model": it never started
    assert line == keys_list.stderr.strip()  # the same cause, word for word
    assert "cannot open the store" in line and "refused" in line.lower()
    assert took < 20, took


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    server = start_s3_server()
    yield server
    server.stop()


def test_an_unreachable_bucket_fails_before_the_model_loads(
    tmp_path: Path, s3_server: S3Server
) -> None:
    env = {
        "AURASERVE_DATA_DIR": str(tmp_path),
        **s3_server.environment_for("no-such-bucket"),
    }
    env.pop("AURASERVE_DATABASE_URL", None)
    result = run_cli("serve", "--model", "tiny", "--port", str(free_port()), env=env)
    assert result.returncode == 2, result.stderr
    problems = [ln for ln in result.stderr.splitlines() if not ln.startswith("store: ")]
    (line,) = problems
    assert "cannot reach the media bucket s3://no-such-bucket/media" in line
    assert "no such bucket" in line and "AURASERVE_MEDIA_URL" in line

    bucket = s3_server.make_bucket()
    env.update(s3_server.environment_for(bucket))
    env["AURASERVE_PORT"] = str(free_port())
    proc, lines = _serve_until_listening(dict(os.environ, **env))
    proc.terminate()
    proc.wait(30)
    assert "listening on" in lines[-1]
