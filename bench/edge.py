"""Edge benchmark: the slow-client attacks of issue 10 against a real `auraserve serve`, on
loopback, while normal clients are measured.

Phases (each stops by itself):
  headers  N connections (20,000) each send a request line, then one header line every 10 s.
  bodies   M connections (4,000) each send a POST head with a valid key and a 1 MB
           Content-Length, then a few body bytes every second.
  big      twenty 32 MB header lines; the server's memory before and after.

During `headers` and `bodies`, two probers ask /health and the authenticated /v2/account, each
request on a fresh connection (a new client is who suffered: empty replies at the fd limit),
and the report gives their p50/p99/max, the p99 of connecting alone, every failure, and the
kernel's count of SYNs dropped at a full accept queue. Attackers run in separate processes with
their open-file limit raised to the hard limit; the report says how many connections were reached.

Two attackers (`--attacker`):
  slowhttptest  Debian's `slowhttptest` (C++, the standard tool; the default where it is
                installed): `-H` for headers, `-B` for bodies, `-c` connections opened at `-r`
                per second (connections / ramp). It does not reconnect: a connection the server
                closes stays closed, so the attack ends early when all are closed. Its own
                per-second CSV (`-g -o`) gives the connections it held; its CPU is reported.
  python        asyncio attackers in separate processes (up to 5,000 connections each, from
                127.0.0.2.. so ports never run out) that drip one byte per body tick and
                reconnect 1 s after each close: a harsher, sustained variant that takes both
                cores of a small machine.

    python bench/edge.py                          # full size; bench/results/edge.json
    python bench/edge.py --connections 2000 --bodies 400 --duration 20    # a quick look
    nice -n -10 python bench/edge.py --attacker-nice 19   # the attackers off the server's CPU
    python bench/edge.py --attacker slowhttptest --phases headers,bodies \
        --out bench/results/edge-slowhttptest.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from server_process import wait_until_serving  # bench/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent
PER_PROCESS = 5000
# What both attackers send: slow headers ask /health, slow bodies go to the sync OpenAI route
# with a valid key and this Content-Length (under the 4 MiB body limit, so the server holds
# and paces the body instead of refusing it at once).
HEADERS_PATH = "/health"
BODY_PATH = "/v1/images/generations"
BODY_LENGTH = 1_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


class Server:
    def __init__(self, data_dir: Path, env_extra: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "AURASERVE_RATE_LIMIT_PER_MINUTE": "0",
            # One key drives every slow body: the per-account cap on sync waits (tested in the
            # suite) would refuse all but 32 at once, and this phase measures the body timeout.
            "AURASERVE_MAX_SYNC_WAITS_PER_ACCOUNT": "1000000",
            **env_extra,
        }
        self.log = data_dir / "server.log"
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "auraserve", "serve", "--model", "tiny"),
                *("--workers", "0", "--data-dir", str(data_dir), "--create"),
                *("--port", str(self.port)),
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.key = wait_until_serving(self.proc, self.log, self.url)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# --- attackers (one process each) ----------------------------------------------------------


def _attacker(kind: str, index: int, count: int, args: dict[str, Any], out: Any) -> None:
    limit = raise_fd_limit()
    if args["attacker_nice"]:
        os.nice(args["attacker_nice"])
    stats = asyncio.run(_attack(kind, index, count, args))
    stats["fd_limit"] = limit
    out.put(stats)


async def _attack(kind: str, index: int, count: int, a: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    end = loop.time() + a["duration"]
    source = f"127.0.0.{2 + index}"
    stats: dict[str, Any] = {"opened": 0, "connect_errors": 0, "closed_by_server": 0}
    lifetimes: list[float] = []
    open_now = 0
    peak = 0
    if kind == "headers":
        head = f"GET {HEADERS_PATH} HTTP/1.1\r\nHost: x\r\n".encode()
        drip, interval = b"X-Slow: 1\r\n", a["header_interval"]
    else:
        head = (
            f"POST {BODY_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {a['key']}\r\nContent-Length: {BODY_LENGTH}\r\n\r\n"
        ).encode()
        drip, interval = b"a", a["body_interval"]

    async def slot(i: int) -> None:
        nonlocal open_now, peak
        await asyncio.sleep(a["ramp"] * i / count)
        while loop.time() < end:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", a["port"], local_addr=(source, 0)
                )
            except OSError:
                stats["connect_errors"] += 1
                await asyncio.sleep(1)
                continue
            stats["opened"] += 1
            open_now += 1
            peak = max(peak, open_now)
            born = loop.time()
            closed = False
            try:
                writer.write(head)
                while loop.time() < end:
                    try:
                        data = await asyncio.wait_for(
                            reader.read(65536), min(interval, max(0.01, end - loop.time()))
                        )
                    except TimeoutError:
                        writer.write(drip)
                        continue
                    if not data:
                        closed = True
                        break
            except OSError:
                closed = True
            open_now -= 1
            if closed:
                stats["closed_by_server"] += 1
                lifetimes.append(loop.time() - born)
            writer.close()
            await asyncio.sleep(a["reconnect_delay"])

    await asyncio.gather(*(slot(i) for i in range(count)))
    stats["peak_open"] = peak
    stats["lifetimes"] = lifetimes
    return stats


def run_attack(kind: str, total: int, args: dict[str, Any]) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    sizes = [PER_PROCESS] * (total // PER_PROCESS) + (
        [total % PER_PROCESS] if total % PER_PROCESS else []
    )
    procs = [
        ctx.Process(target=_attacker, args=(kind, i, n, args, out)) for i, n in enumerate(sizes)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=args["duration"] + 120) for _ in procs]
    for p in procs:
        p.join(30)
    lifetimes = sorted(x for r in results for x in r["lifetimes"])
    return {
        "connections": total,
        "processes": len(procs),
        "fd_limit_per_process": min(r["fd_limit"] for r in results),
        # Peaks of each process, added: a ceiling on the simultaneous total.
        "peak_open_sum": sum(r["peak_open"] for r in results),
        "opened": sum(r["opened"] for r in results),
        "connect_errors": sum(r["connect_errors"] for r in results),
        "closed_by_server": sum(r["closed_by_server"] for r in results),
        "lifetime_p50_s": round(statistics.median(lifetimes), 2) if lifetimes else None,
        "lifetime_max_s": round(lifetimes[-1], 2) if lifetimes else None,
    }


# --- slowhttptest (Debian's slow-client attack tool) ----------------------------------------

SLOWHTTPTEST = shutil.which("slowhttptest")
# Its own per-second statistics (-g -o PREFIX writes PREFIX.csv): sockets in each state.
SLOWHTTPTEST_CSV_HEADER = "Seconds,Closed,Pending,Connected,Service Available"
# slowhttptest keeps 6 descriptors for itself (stdio, its probe, its two report files) and
# lowers -c to the open-file limit minus these when the limit is short.
SLOWHTTPTEST_OWN_FDS = 6
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def slowhttptest_command(
    kind: str, connections: int, args: dict[str, Any], prefix: Path
) -> list[str]:
    """The slowhttptest command line of one phase. slowhttptest takes whole seconds."""
    url = f"http://127.0.0.1:{args['port']}"
    # The Python attackers' pace: all connections opened over the ramp. It opens one socket per
    # turn of its loop and each turn polls all it holds, so past a few thousand it opens fewer
    # than -r a second ("opened" in the report; 15,367 of 19,994 in 45 s at -r 2000).
    rate = args["rate"] or math.ceil(connections / max(args["ramp"], 1))
    common = [
        *("-c", str(connections), "-r", str(rate), "-l", str(math.ceil(args["duration"]))),
        *("-g", "-o", str(prefix)),
    ]
    assert SLOWHTTPTEST is not None
    if kind == "headers":
        interval = max(1, round(args["header_interval"]))
        return [SLOWHTTPTEST, "-H", *common, "-i", str(interval), "-u", url + HEADERS_PATH]
    interval = max(1, round(args["body_interval"]))
    # slowhttptest 1.8 has no option for a header of one's own (1.9's -1 is not in Debian), but
    # it writes the -j cookie value verbatim into the head: a CRLF in it adds our key's header,
    # so its bodies carry the same valid key as the Python attackers'.
    cookie = f"auraserve_bench=1\r\nAuthorization: Bearer {args['key']}"
    return [
        *(SLOWHTTPTEST, "-B", *common, "-i", str(interval), "-s", str(BODY_LENGTH)),
        *("-f", "application/json", "-j", cookie, "-u", url + BODY_PATH),
    ]


def parse_slowhttptest_csv(text: str) -> dict[str, Any]:
    """Its per-second rows: the most connections held at once, how many the server closed,
    and the seconds its own probe (a GET of the same URL, 5 s timeout) got no reply."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != SLOWHTTPTEST_CSV_HEADER:
        raise ValueError(f"not a slowhttptest CSV: {lines[:1]}")
    rows = [[int(value) for value in line.split(",")] for line in lines[1:]]
    if not rows:
        return {"seconds": 0}
    return {
        "seconds": rows[-1][0],
        "connected_max": max(r[3] for r in rows),
        "pending_max": max(r[2] for r in rows),
        # Sockets it opened, in any state (its errors are not in the CSV: see "errors").
        "opened": max(r[1] + r[2] + r[3] for r in rows),
        # Closed by the server (a deadline, an eviction at the connection cap) or on a failed
        # send: slowhttptest does not tell them apart.
        "closed": rows[-1][1],
        "connected_at_end": rows[-1][3],
        # Every 5th second, for the shape: the ramp, the plateau at the server's cap, the decay.
        "connected_every_5s": [r[3] for r in rows if r[0] % 5 == 0],
        "probe_unavailable_s": sum(1 for r in rows if r[4] == 0),
    }


def parse_slowhttptest_log(text: str) -> dict[str, Any]:
    """What its CSV lacks, from its console: sockets it failed to set up (the last status
    block's "error:"), why it stopped, and whether it lowered -c to its open-file limit."""
    text = _ANSI.sub("", text)
    errors = re.findall(r"^error:\s+(\d+)", text, re.MULTILINE)
    exit_status = re.search(r"Exit status:\s*(.+)", text)
    lowered = re.search(r"Decreasing target connection number to (\d+)", text)
    return {
        "errors": int(errors[-1]) if errors else None,
        "socket_init_failures": len(re.findall(r"Unable to initialize", text)),
        "exit_status": exit_status.group(1).strip() if exit_status else None,
        "lowered_connections_to": int(lowered.group(1)) if lowered else None,
    }


def run_slowhttptest(kind: str, total: int, args: dict[str, Any]) -> dict[str, Any]:
    """One slowhttptest run in a subprocess, its open-file limit raised as far as the hard
    limit allows, its CPU read with psutil (once a second, and in full once it has exited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = total + SLOWHTTPTEST_OWN_FDS
    fd_limit = max(soft, wanted) if hard == resource.RLIM_INFINITY else hard
    # Short of descriptors it would lower -c itself; lowered here, the report says so.
    connections = min(total, fd_limit - SLOWHTTPTEST_OWN_FDS)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / kind
        command = slowhttptest_command(kind, connections, args, prefix)
        console = Path(tmp) / "console.log"
        started = time.monotonic()
        with console.open("w") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
        watched = psutil.Process(proc.pid)
        # Set from here rather than in a preexec_fn (unsafe with the probers' threads running).
        # Should the tool read its limit first, it raises it the same way itself. One that has
        # already exited is reported below, with its console.
        with contextlib.suppress(psutil.Error):
            watched.rlimit(psutil.RLIMIT_NOFILE, (fd_limit, hard))
            if args["attacker_nice"]:
                watched.nice(args["attacker_nice"])
        cpu = attacker_cpu(proc, watched, deadline=started + args["duration"] + 120)
        wall = time.monotonic() - started
        csv_path = prefix.with_suffix(".csv")
        stats = parse_slowhttptest_csv(csv_path.read_text()) if csv_path.exists() else {}
        log_text = console.read_text(errors="replace")
    if proc.returncode != 0 or not stats:
        raise RuntimeError(f"slowhttptest failed ({proc.returncode}): {log_text[-2000:]}")
    shown = [repr(part) if "\r" in part else part for part in command[1:]]
    # The key is this run's own (a fresh store), but results are committed: left out.
    shown = [part.replace(args["key"], "<key>").replace(tmp, "<tmp>") for part in shown]
    return {
        "attacker": "slowhttptest",
        "command": " ".join(shown),
        "connections_requested": total,
        "connections": connections,
        "fd_limit": fd_limit,
        **stats,
        **parse_slowhttptest_log(log_text),
        "ran_s": round(wall, 1),
        # Cores it used over its run, and in its busiest second. Once the server has closed
        # some of its sockets, 1.8.2 spins: their stale poll entries return at once (thousands
        # of poll calls a second, strace), so most of this is that loop, not the attack.
        "attacker_cpu_cores": round(cpu["seconds"] / wall, 2),
        "attacker_cpu_cores_peak_1s": cpu["peak"],
    }


def attacker_cpu(
    proc: subprocess.Popen[bytes], watched: psutil.Process, deadline: float
) -> dict[str, float]:
    """CPU seconds `proc` used, read with psutil, and its busiest second (in cores). The total
    is read once it has exited and before it is reaped: a zombie keeps its counters."""
    used = peak = 0.0
    sampled = time.monotonic()
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if time.monotonic() > deadline:
            proc.terminate()
        time.sleep(1)
        try:
            times = watched.cpu_times()
        except psutil.NoSuchProcess:
            break
        now = time.monotonic()
        peak = max(peak, (times.user + times.system - used) / (now - sampled))
        used, sampled = times.user + times.system, now
    try:
        times = watched.cpu_times()
        used = times.user + times.system
    except psutil.NoSuchProcess:
        pass
    proc.wait()
    return {"seconds": used, "peak": round(peak, 2)}


def attack(kind: str, total: int, args: dict[str, Any]) -> dict[str, Any]:
    if args["attacker"] == "slowhttptest":
        return run_slowhttptest(kind, total, args)
    return run_attack(kind, total, args)


# --- normal clients ------------------------------------------------------------------------


class Prober(threading.Thread):
    """A normal client: one request at a time, each on a fresh connection (a new client is who
    suffered: empty replies at the fd limit). Raw sockets, so that the time to connect (the
    kernel's handshake: a SYN dropped at a full accept queue costs a 1 s, 3 s... retry) and the
    time from request to complete reply (the server's accept, parsing and answer) are told
    apart."""

    def __init__(self, port: int, path: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.port = port
        lines = [f"GET {path} HTTP/1.1", "Host: x", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.latencies: list[float] = []
        self.connects: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def one(self) -> None:
        start = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                self.connects.append(time.monotonic() - start)
                sock.sendall(self.request)
                reply = bytearray()
                while chunk := sock.recv(65536):
                    reply += chunk
        except OSError as exc:
            self.failures.append(type(exc).__name__)
        else:
            if not reply:
                self.failures.append("empty reply")
            elif not reply.startswith(b"HTTP/1.1 200 "):
                self.failures.append(reply.split(b"\r\n", 1)[0].decode("latin-1"))
        self.latencies.append(time.monotonic() - start)

    def run(self) -> None:
        while not self.stop.is_set():
            self.one()
            time.sleep(0.05)

    def summary(self) -> dict[str, Any]:
        if not self.latencies:
            return {"requests": 0}

        def q(values: list[float], p: float) -> float:
            values = sorted(values)
            return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 1)

        return {
            "requests": len(self.latencies),
            "p50_ms": q(self.latencies, 0.5),
            "p99_ms": q(self.latencies, 0.99),
            "max_ms": round(max(self.latencies) * 1000, 1),
            # Of the whole: waiting for the handshake (a dropped SYN shows as ~1,000 ms).
            "connect_p99_ms": q(self.connects, 0.99) if self.connects else None,
            "over_100ms": sum(1 for x in self.latencies if x > 0.1),
            "failures": len(self.failures),
            "failure_kinds": sorted(set(self.failures)),
        }


def listen_overflows() -> int:
    """The kernel's count of connections dropped at a full accept queue (all listeners)."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names[0] == "TcpExt:":
            return int(values[names.index("ListenOverflows")])
    return 0


def measured(server: Server, attack: Any) -> dict[str, Any]:
    probers = [
        Prober(server.port, "/health", {}),
        Prober(server.port, "/v2/account", {"Authorization": f"Bearer {server.key}"}),
    ]
    for p in probers:
        p.start()
    fds: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1):
            fds.append(server.open_fds())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu, wall, dropped = server.cpu_seconds(), time.monotonic(), listen_overflows()
    result = attack()
    cpu, wall = server.cpu_seconds() - cpu, time.monotonic() - wall
    dropped = listen_overflows() - dropped
    done.set()
    for p in probers:
        p.stop.set()
        p.join(30)
    return {
        "attack": result,
        "server_open_fds_max": max(fds, default=0),
        # Below 1.0 with slow probes: the server waited for a core (the attackers, the probes
        # and anything else on the machine share them), not for its own work.
        "server_cpu_share": round(cpu / wall, 2),
        # SYNs dropped because the accept queue was full (anyone's: the probes' among them).
        "listen_overflows": dropped,
        "load_average_1m": os.getloadavg()[0],
        "health": probers[0].summary(),
        "account": probers[1].summary(),
    }


def big_headers(server: Server, count: int, size: int) -> dict[str, Any]:
    before = server.rss_mb()
    answers: list[bytes] = []

    def one() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sent = 0
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                chunk = b"a" * 65536
                while sent < size:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            try:
                answers.append(sock.recv(200).split(b"\r\n", 1)[0])
            except OSError:
                answers.append(b"(reset)")

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    time.sleep(1)
    return {
        "headers": count,
        "bytes_each": size,
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(server.rss_mb(), 1),
        "answers": sorted({a.decode("latin-1") for a in answers}),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--attacker",
        choices=("slowhttptest", "python"),
        default="slowhttptest" if SLOWHTTPTEST else "python",
        help="slowhttptest (default where installed) or the reconnecting Python attackers",
    )
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--bodies", type=int, default=4_000)
    parser.add_argument("--duration", type=float, default=45.0, help="seconds per attack")
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds to open them all")
    parser.add_argument(
        "--rate",
        type=int,
        default=0,
        help="slowhttptest: connections opened per second (default: connections / ramp)",
    )
    parser.add_argument("--header-interval", type=float, default=10.0)
    parser.add_argument("--body-interval", type=float, default=1.0)
    parser.add_argument("--reconnect-delay", type=float, default=1.0)
    parser.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        help="niceness of the attacker processes (19: they take only CPU the server leaves, "
        "as if they ran elsewhere)",
    )
    parser.add_argument("--phases", default="headers,bodies,big")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "edge.json")
    opts = parser.parse_args(argv)
    if opts.attacker == "slowhttptest" and not SLOWHTTPTEST:
        parser.error("slowhttptest is not installed (Debian: apt-get install slowhttptest)")
    bench_fd_limit = raise_fd_limit()
    report: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "bench_fd_limit": bench_fd_limit,
        "attacker": opts.attacker,
        "attacker_nice": opts.attacker_nice,
        "somaxconn": int(Path("/proc/sys/net/core/somaxconn").read_text()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), {})
        try:
            args = {
                "attacker": opts.attacker,
                "port": server.port,
                "key": server.key,
                "duration": opts.duration,
                "ramp": opts.ramp,
                "rate": opts.rate,
                "header_interval": opts.header_interval,
                "body_interval": opts.body_interval,
                "reconnect_delay": opts.reconnect_delay,
                "attacker_nice": opts.attacker_nice,
            }
            phases = opts.phases.split(",")
            if "headers" in phases:
                report["headers"] = measured(
                    server, lambda: attack("headers", opts.connections, args)
                )
                print(json.dumps(report["headers"], indent=1), flush=True)
            if "bodies" in phases:
                report["bodies"] = measured(server, lambda: attack("bodies", opts.bodies, args))
                print(json.dumps(report["bodies"], indent=1), flush=True)
            if "big" in phases:
                report["big"] = big_headers(server, 20, 32 * 1024 * 1024)
                print(json.dumps(report["big"], indent=1), flush=True)
        finally:
            server.stop()
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
