"""Scale-out benchmark: `auraserve serve --api-processes N` on SQLite and on PostgreSQL.

A real server runs as its own process tree (tiny model); load comes from other processes on
loopback. Measured per backend:

- status polls/s with p50/p99 and submits/s, against an API-only server (`--workers 0`: on a
  2-core machine a CPU "GPU" worker would take the cores the API is measured on), and
  `GET /healthz`/s beside them: the framework's floor, which shows how fast the machine is
  at that moment (this VM's speed drifts);
- the wake-up latencies, against a server with its in-process worker (which runs in the
  supervisor, the API children being other processes): submit -> claim on an idle worker
  (`started_at - created_at`) and completion -> sync response (the client's clock at the last
  byte of a `POST /v1/aura-flow` minus the job's `completed_at`; same machine, same clock).

The load generator is `wrk` (C, Debian package `wrk`) when installed, else (or with
`--client python`) Python processes keeping raw HTTP/1.1 keep-alive connections, one request
in flight per connection. The Python client costs a core of its own at these rates: its numbers
understate the server.

    python bench/scaleout.py                              # both backends, 2 API processes
    python bench/scaleout.py --backend sqlite --processes 1 2 3
    python bench/scaleout.py --duration 2 --client python # quick smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import create_engine, text

from server_process import run_wrk, wrk_script  # bench/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent
SEED_PATH = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
PG_ADMIN_URL = os.environ.get("AURASERVE_TEST_PG_URL", "postgresql://127.0.0.1:5432/test")
SUBMIT_BODY = json.dumps({"prompt": "a lighthouse at dusk", "num_inference_steps": 2})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the server -----------------------------------------------------------------------------


class Server:
    """`auraserve serve --api-processes N` as a subprocess, on a fresh store."""

    def __init__(self, data_dir: Path, database_url: str, processes: int, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url
        env = dict(os.environ)
        env.update(
            AURASERVE_MAX_QUEUED_PER_ACCOUNT=str(10**9),
            AURASERVE_BOOTSTRAP_CREDITS=str(10**15),
            # Measuring the service's capacity, not one account's quota.
            AURASERVE_RATE_LIMIT_PER_MINUTE="0",
            AURASERVE_DATABASE_URL=database_url,
        )
        self.log = data_dir / "server.log"
        command = [sys.executable, "-m", "auraserve", "serve", "--model", "tiny"]
        command += ["--data-dir", str(data_dir), "--create", "--port", str(self.port)]
        command += ["--workers", str(workers), "--api-processes", str(processes)]
        self.proc = subprocess.Popen(
            command, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env
        )
        self.key = self._wait_until_serving()
        self._wait_until_listening(processes)
        self.headers = {"Ocp-Apim-Subscription-Key": self.key}

    def _wait_until_serving(self, timeout: float = 300) -> str:
        """The first-start key from the log, once /health answers. Like
        server_process.wait_until_serving, with room for a busy machine: loading even the
        tiny model imports torch, which takes minutes when the cores are shared."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            match = re.search(r"(aura_[0-9a-f]{16}_\S+)", self.log.read_text())
            if match:
                try:
                    if httpx.get(f"{self.url}/health").status_code == 200:
                        return match.group(1)
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start: {self.log.read_text()}")

    def _wait_until_listening(self, processes: int, timeout: float = 120) -> None:
        """Every API child listening on the port: /health answers as soon as one does, and
        wrk's connections, made at its start, would all go to that one (seen: a PostgreSQL
        submit run at 0.82 + 0.05 cores while the second child was still starting)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listening = 0
            for child in self.tree()[1:]:
                with contextlib.suppress(psutil.Error):
                    listening += any(
                        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port
                        for c in child.net_connections(kind="tcp")
                    )
            # With one API process, `serve` itself listens (no children).
            if listening >= processes or processes == 1:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{processes} API processes did not all listen: {self.log.read_text()}")

    def tree(self) -> list[psutil.Process]:
        """The supervisor and its API children (multiprocessing's resource tracker aside)."""
        root = psutil.Process(self.proc.pid)
        children = [c for c in root.children() if "resource_tracker" not in " ".join(c.cmdline())]
        return [root, *children]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def store(backend: str, data_dir: Path) -> Any:
    """A database URL for a fresh store: SQLite in the data dir, or a new PostgreSQL database
    (dropped afterwards)."""
    if backend == "sqlite":
        yield f"sqlite:///{data_dir / 'auraserve.db'}"
        return
    name = f"auraserve_bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(
        PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


# --- load generators ------------------------------------------------------------------------


def wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    method: str,
    headers: dict[str, str],
    body: str | None,
) -> dict[str, Any]:
    lua = wrk_script(method, headers, body)
    return run_wrk(url, connections=connections, duration=duration, lua=lua)


def _raw_request(url: str, method: str, headers: dict[str, str], body: str | None) -> bytes:
    host_port, _, path = url.removeprefix("http://").partition("/")
    lines = [f"{method} /{path} HTTP/1.1", f"Host: {host_port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    payload = (body or "").encode()
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def _connection(
    host: str,
    port: int,
    request: bytes,
    until: float,
    latencies: list[float],
    statuses: dict[int, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < until:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            statuses[status] = statuses.get(status, 0) + 1
            if re.search(rb"(?i)\r\nconnection:\s*close", head):
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


def _client_process(
    url: str, request: bytes, connections: int, duration: float
) -> tuple[list[float], dict[int, int]]:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def run() -> None:
        until = time.perf_counter() + duration
        await asyncio.gather(
            *(
                _connection(host, int(port), request, until, latencies, statuses)
                for _ in range(connections)
            )
        )

    asyncio.run(run())
    return latencies, statuses


def python_load(
    url: str,
    *,
    connections: int,
    duration: float,
    method: str,
    headers: dict[str, str],
    body: str | None,
    processes: int = 2,
) -> dict[str, Any]:
    """Raw keep-alive HTTP/1.1 from `processes` Python processes, no pipelining."""
    request = _raw_request(url, method, headers, body)
    processes = max(1, min(processes, connections))
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        results = list(
            pool.map(
                _client_process,
                [url] * processes,
                [request] * processes,
                shares,
                [duration] * processes,
            )
        )
    latencies = sorted(x for lat, _ in results for x in lat)
    statuses: dict[int, int] = {}
    for _, counts in results:
        for status, n in counts.items():
            statuses[status] = statuses.get(status, 0) + n
    done = len(latencies)
    return {
        "client": f"python x{processes}",
        "connections": connections,
        "rate": done / duration,
        "p50_ms": 1000 * latencies[done // 2] if done else float("nan"),
        "p99_ms": 1000 * latencies[min(done - 1, int(done * 0.99))] if done else float("nan"),
        "non_2xx": sum(n for s, n in statuses.items() if not 200 <= s < 400),
        "socket_errors": "",
    }


def load(client: str, url: str, **kwargs: Any) -> dict[str, Any]:
    return wrk(url, **kwargs) if client == "wrk" else python_load(url, **kwargs)


def cpu_during(server: Server, run: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """`run()`'s result and the CPU seconds the server's processes used meanwhile, per process
    (supervisor first), as a share of one core."""
    procs = server.tree()
    before = [p.cpu_times() for p in procs]
    started = time.monotonic()
    result = run()
    elapsed = time.monotonic() - started
    shares = {}
    for i, (proc, cpu) in enumerate(zip(procs, before, strict=True)):
        try:
            now = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        used = (now.user - cpu.user) + (now.system - cpu.system)
        shares["supervisor" if i == 0 else f"api-{i}"] = round(used / elapsed, 2)
    return result, shares


# --- phases ---------------------------------------------------------------------------------


def throughput(
    server: Server, client: str, duration: float, connections: list[int]
) -> dict[str, Any]:
    submits = []
    for c in connections:
        result, cpu = cpu_during(
            server,
            lambda c=c: load(
                client,
                server.url + SEED_PATH,
                connections=c,
                duration=duration,
                method="POST",
                # The body's type: without it every submit is a 415 (wrk sends no header of
                # its own; the Python client adds it).
                headers={**server.headers, "Content-Type": "application/json"},
                body=SUBMIT_BODY,
            ),
        )
        submits.append({**result, "server_cpu": cpu})
    # A job in the middle of the queue the submits left: its queue_position is counted.
    rid = httpx.post(
        server.url + SEED_PATH, headers=server.headers, json={"prompt": "poll me"}
    ).json()["request_id"]
    polled = httpx.get(f"{server.url}/v2/requests/status/{rid}", headers=server.headers).json()
    polls = _runs(
        server,
        client,
        f"{server.url}/v2/requests/status/{rid}",
        connections,
        duration,
        headers=server.headers,
    )
    # The framework's floor on this machine right now: the cheapest route. This VM's speed
    # drifts by up to ~1.8x over a day, so every rate above is read beside this one.
    floor = _runs(server, client, f"{server.url}/healthz", connections, duration, headers={})
    return {
        "submit": submits,
        "poll": polls,
        "healthz": floor,
        "poll_queue_position": polled.get("queue_position"),
    }


def _runs(
    server: Server,
    client: str,
    url: str,
    connections: list[int],
    duration: float,
    *,
    headers: dict[str, str],
) -> list[dict[str, Any]]:
    """GET `url` at each connection count, with the server's CPU meanwhile."""
    runs = []
    for c in connections:
        result, cpu = cpu_during(
            server,
            lambda c=c: load(
                client,
                url,
                connections=c,
                duration=duration,
                method="GET",
                headers=headers,
                body=None,
            ),
        )
        runs.append({**result, "server_cpu": cpu})
    return runs


def _job_times(database_url: str, job_ids: list[str]) -> dict[str, tuple[float, float, float]]:
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT id, created_at, started_at, completed_at FROM jobs")
            ).all()
    finally:
        engine.dispose()
    wanted = set(job_ids)
    return {r.id: (r.created_at, r.started_at, r.completed_at) for r in rows if r.id in wanted}


def wakeups(server: Server, jobs: int) -> dict[str, Any]:
    """One job at a time on an idle worker: submit -> claim, and completion -> sync response."""
    form = {
        "prompt": "wake",
        "steps": "1",
        "width": "512",
        "height": "512",
        "output_format": "jpeg",
    }
    claim_ids: list[str] = []
    sync: list[tuple[str, float]] = []
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        for i in range(jobs + 2):
            # Async submit, then wait for the end: the worker is idle (waiting) at each submit.
            time.sleep(0.2)
            rid = http.post(
                SEED_PATH,
                json={
                    "prompt": "wake",
                    "num_inference_steps": 1,
                    "seed": i,
                    "output_format": "jpeg",
                },
            ).json()
            rid = rid["request_id"]
            while http.get(f"/v2/requests/status/{rid}").json()["status"] not in (
                "COMPLETED",
                "ERROR",
                "FAILED",
            ):
                time.sleep(0.05)
            if i >= 2:  # warm-up
                claim_ids.append(rid.partition("_")[2])
            time.sleep(0.2)
            response = http.post("/v1/aura-flow", data={**form, "seed": str(i)})
            received = time.time()
            if response.status_code != 200:
                raise RuntimeError(f"sync request failed: {response.status_code} {response.text}")
            if i >= 2:
                # The job's request id ("<model>_<job id>"), not a per-request log id.
                rid = next(v for v in response.headers.get_list("x-request-id") if "_" in v)
                sync.append((rid.partition("_")[2], received))
    times = _job_times(server.database_url, claim_ids + [j for j, _ in sync])
    claim_ms = [1000 * (times[j][1] - times[j][0]) for j in claim_ids]
    sync_ms = [1000 * (at - times[j][2]) for j, at in sync]
    return {
        "jobs": jobs,
        "submit_to_claim_ms": {"median": statistics.median(claim_ms), "max": max(claim_ms)},
        "completion_to_sync_response_ms": {
            "median": statistics.median(sync_ms),
            "max": max(sync_ms),
        },
    }


def run_backend(backend: str, processes: int, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"backend": backend, "api_processes": processes}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        if not args.skip_throughput:
            (data / "t").mkdir()
            with store(backend, data / "t") as url:
                server = Server(data / "t", url, processes, workers=0)
                try:
                    result["throughput"] = throughput(
                        server, args.client, args.duration, args.connections
                    )
                finally:
                    server.stop()
        if args.wakeup_jobs > 0:
            (data / "w").mkdir()
            with store(backend, data / "w") as url:
                server = Server(data / "w", url, processes, workers=1)
                try:
                    result["wakeup"] = wakeups(server, args.wakeup_jobs)
                finally:
                    server.stop()
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| store | API processes | phase | connections | req/s | p50 ms | p99 ms | non-2xx | "
        "server CPU (cores) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        for phase in ("submit", "poll", "healthz"):
            for row in r.get("throughput", {}).get(phase, []):
                cpu = " + ".join(f"{v:.2f}" for v in row["server_cpu"].values())
                lines.append(
                    f"| {r['backend']} | {r['api_processes']} | {phase} | {row['connections']} | "
                    f"{row['rate']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                    f"{row['non_2xx']} | {cpu} |"
                )
    lines += [
        "",
        "| store | API processes | submit → claim, median (max) | "
        "completion → sync response, median (max) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results:
        w = r.get("wakeup")
        if w:
            c, s = w["submit_to_claim_ms"], w["completion_to_sync_response_ms"]
            lines.append(
                f"| {r['backend']} | {r['api_processes']} | {c['median']:.1f} ms "
                f"({c['max']:.1f}) | {s['median']:.1f} ms ({s['max']:.1f}) |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[2], help="API process counts to measure"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--wakeup-jobs", type=int, default=20, help="jobs for the wake-up latencies (0: skip)"
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaleout.json")
    args = parser.parse_args(argv)
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = [run_backend(b, n, args) for b in backends for n in args.processes]
    report = {
        "client": args.client,
        "duration_s": args.duration,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_average_at_end": os.getloadavg(),
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(results))
    return report


if __name__ == "__main__":
    main()
