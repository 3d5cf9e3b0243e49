"""Shared by the benchmarks that start a real `auraserve serve` subprocess."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx


def wait_until_serving(proc: subprocess.Popen[bytes], log: Path, url: str) -> str:
    """Wait for the first-start key in the server's log, then for /health; return the key."""
    deadline = time.monotonic() + 120
    key = ""
    while not key:
        match = re.search(r"(aura_[0-9a-f]{16}_\S+)", log.read_text())
        if match:
            key = match.group(1)
        elif time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"server did not start: {log.read_text()}")
        else:
            time.sleep(0.1)
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return key
        except httpx.TransportError:
            time.sleep(0.1)
