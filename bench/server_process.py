"""Shared by the benchmarks that start a real `auraserve serve` subprocess and load it with
`wrk` (Debian package `wrk`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

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


def wrk_script(method: str, headers: dict[str, str], body: str | None) -> str:
    """The Lua script that makes wrk send `method` with `headers` and `body`."""
    lua = f'wrk.method = "{method}"\n'
    if body is not None:
        lua += f"wrk.body = {json.dumps(body)}\n"
    for name, value in headers.items():
        lua += f'wrk.headers["{name}"] = "{value}"\n'
    return lua


def run_wrk(url: str, *, connections: int, duration: float, lua: str) -> dict[str, Any]:
    """One wrk run (one thread: it needs a fraction of a core at these rates, and the server
    gets the rest of the machine): rate, p50/p99 in ms, non-2xx and socket errors."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(lua)
    try:
        command = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration:g}s"]
        proc = subprocess.run(
            [*command, "--latency", "-s", fh.name, url],
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(fh.name)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {proc.stdout} {proc.stderr}")
    out = proc.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "client": "wrk",
        "connections": connections,
        "rate": rate,
        "p50_ms": _ms(lat["50"]),
        "p99_ms": _ms(lat["99"]),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def _ms(value: str) -> float:
    number = re.match(r"[\d.]+", value).group(0)  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}[value[len(number) :]]
