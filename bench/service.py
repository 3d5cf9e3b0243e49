"""Service benchmark: submit throughput, status-poll throughput and latency, and the service's
own overhead per job, on the embedded default (SQLite + local disk) with the tiny model.

The server runs as its own process (`auraserve serve`); load comes from `wrk` (a C load
generator, Debian package `wrk`) in another process on loopback, so the client is not the
bottleneck. Throughput phases run against an API-only server (`--workers 0`): on this 2-core
machine an in-process CPU "GPU" worker would otherwise steal the cores the API is measured on.
The overhead phase runs the real in-process worker.

    python bench/service.py                 # a markdown table; bench/results/service.json
    python bench/service.py --duration 10   # longer runs per rate
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from server_process import run_wrk, wait_until_serving  # bench/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent
SEED_PATH = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
CONNECTIONS = (1, 4, 16, 64)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, data_dir: Path, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            AURASERVE_MAX_QUEUED_PER_ACCOUNT=str(10**9),
            AURASERVE_BOOTSTRAP_CREDITS=str(10**15),
            # Measuring the service's capacity, not one account's quota.
            AURASERVE_RATE_LIMIT_PER_MINUTE="0",
        )
        # Output goes to a file: a pipe nobody reads would eventually block the server.
        self.log = data_dir / "server.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "auraserve",
                "serve",
                "--model",
                "tiny",
                "--data-dir",
                str(data_dir),
                "--create",
                "--port",
                str(self.port),
                "--workers",
                str(workers),
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.key = wait_until_serving(self.proc, self.log, self.url)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def lua_post(key: str) -> str:
    body = json.dumps({"prompt": "a lighthouse at dusk", "num_inference_steps": 2})
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Ocp-Apim-Subscription-Key"] = "{key}"\n'
    )


def lua_get(key: str) -> str:
    return f'wrk.headers["Ocp-Apim-Subscription-Key"] = "{key}"\n'


def throughput(duration: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), workers=0)
        try:
            headers = {"Ocp-Apim-Subscription-Key": server.key}
            submits = [
                run_wrk(
                    server.url + SEED_PATH,
                    connections=c,
                    duration=duration,
                    lua=lua_post(server.key),
                )
                for c in CONNECTIONS
            ]
            # Poll a job in the middle of a deep queue (its position is counted per poll) and
            # a job near the head.
            rid = httpx.post(
                server.url + SEED_PATH, headers=headers, json={"prompt": "poll me"}
            ).json()["request_id"]
            status = httpx.get(f"{server.url}/v2/requests/status/{rid}", headers=headers).json()
            polls = [
                run_wrk(
                    f"{server.url}/v2/requests/status/{rid}",
                    connections=c,
                    duration=duration,
                    lua=lua_get(server.key),
                )
                for c in CONNECTIONS
            ]
            return {
                "submit": submits,
                "poll": polls,
                "poll_queue_position": status.get("queue_position"),
            }
        finally:
            server.stop()


def overhead(jobs: int, output_format: str) -> dict[str, Any]:
    """Submit → COMPLETED minus the engine's own time, one job at a time on an idle server.

    Image encoding is not engine time, so it counts as overhead here; with the tiny model's
    noise images PNG is its worst case (noise does not compress), so the phase runs once with
    JPEG (near-free encode: the service's own cost) and once with PNG."""
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), workers=1)
        try:
            headers = {"Ocp-Apim-Subscription-Key": server.key}
            samples = []
            with httpx.Client(base_url=server.url, headers=headers) as client:
                for i in range(jobs + 3):
                    rid = client.post(
                        SEED_PATH,
                        json={
                            "prompt": "overhead",
                            "num_inference_steps": 1,
                            "seed": i,
                            "output_format": output_format,
                        },
                    ).json()["request_id"]
                    while True:
                        body = client.get(f"/v2/requests/status/{rid}").json()
                        if body["status"] == "COMPLETED":
                            break
                        time.sleep(0.02)
                    if i < 3:
                        continue  # warm-up
                    total = _ts(body["completed_at"]) - _ts(body["created_at"])
                    samples.append(1000 * (total - body["metrics"]["inference_time"]))
            return {
                "format": output_format,
                "jobs": len(samples),
                "median_ms": statistics.median(samples),
                "p90_ms": statistics.quantiles(samples, n=10)[-1],
                "engine_ms_last": 1000 * body["metrics"]["inference_time"],
            }
        finally:
            server.stop()


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def table(result: dict[str, Any]) -> str:
    lines = [
        "| phase | connections | req/s | p50 ms | p99 ms | non-2xx |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in ("submit", "poll"):
        for r in result[phase]:
            lines.append(
                f"| {phase} | {r['connections']} | {r['rate']:.0f} | {r['p50_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {r['non_2xx']} |"
            )
    lines.append("")
    for o in result["overhead"]:
        lines.append(
            f"Service overhead, {o['format']} output (submit → COMPLETED minus engine time, "
            f"{o['jobs']} jobs): median {o['median_ms']:.1f} ms, p90 {o['p90_ms']:.1f} ms "
            f"(engine time per job ≈ {o['engine_ms_last']:.0f} ms)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per rate")
    parser.add_argument("--jobs", type=int, default=40, help="jobs for the overhead phase")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    result = throughput(args.duration)
    result["overhead"] = [overhead(args.jobs, fmt) for fmt in ("jpeg", "png")]
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
