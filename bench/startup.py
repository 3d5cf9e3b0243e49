"""Start-up benchmark: what an admin command and an API-only replica cost to start, measured
side by side on two source trees (issue 8, point 1: a torch-free service side).

Each tree runs its own code (`PYTHONPATH=<tree>/src`) with the same interpreter and packages,
on its own fresh SQLite store:

- `auraserve keys list`: wall time, CPU time and peak RSS of the whole process (median of
  `--runs`); CPU time is the fairer figure on a busy machine, where wall time includes waiting;
  the peak RSS is the child's own `ru_maxrss` from `wait4`, not the maximum over all children.
- `auraserve serve --workers 0`: time from start until `/health` answers, and the CPU time
  and resident memory (VmRSS) at that moment (median of `--serve-runs`).

It also records whether `keys list` loaded torch (checked in the process itself, at exit).

    python bench/startup.py                          # this tree against /work/before
    python bench/startup.py --before ../old --runs 9
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "startup.json"

# Run as `python -c`: keys list, then report whether torch got loaded (stderr, last line).
_KEYS_LIST_PROBE = """
import atexit, sys
atexit.register(lambda: print("TORCH=" + str("torch" in sys.modules), file=sys.stderr))
sys.argv = ["auraserve", "keys", "list"]
from auraserve.cli import main
main()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_env(tree: Path, data_dir: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AURASERVE_") and k != "PYTHONPATH"
    }
    env.update(
        PYTHONPATH=str(tree / "src"),
        AURASERVE_DATA_DIR=str(data_dir),
        # Neither measurement may reach the network (a hub lookup would dominate the time).
        HF_HUB_OFFLINE="1",
    )
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "auraserve", *args]


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    # wait4 gives this child's own rusage; RUSAGE_CHILDREN would be the maximum over all.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: KiB


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    # /proc/<pid>/stat: utime and stime are fields 14 and 15, in clock ticks; the command
    # name (field 2) may hold spaces, so count from its closing parenthesis.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_once(env: dict[str, str], timeout: float = 120) -> tuple[float, float, float]:
    """Seconds until /health answers, CPU seconds and VmRSS (MiB) then, of `serve --workers 0`."""
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(
        cli("serve", "--workers", "0", "--port", str(port)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    ready = time.perf_counter() - start
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {proc.returncode}") from None
                if time.perf_counter() - start > timeout:
                    raise RuntimeError("serve did not answer /health in time") from None
                time.sleep(0.01)
        return ready, cpu_seconds(proc.pid), vm_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


def measure_tree(label: str, tree: Path, runs: int, serve_runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"auraserve-startup-{label}-") as tmp:
        env = tree_env(tree, Path(tmp) / "data")
        # A store with one key, so `keys list` reads a real one (and refuses nothing).
        # `db upgrade` first: every tree creates its configured store that way, while `keys
        # create` makes one only with --create (which older trees do not know).
        for args in (("db", "upgrade"), ("keys", "create", "--name", "bench")):
            subprocess.run(cli(*args), env=env, check=True, capture_output=True)
        probe = subprocess.run(
            [sys.executable, "-c", _KEYS_LIST_PROBE],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        loads_torch = probe.stderr.strip().splitlines()[-1] == "TORCH=True"
        keys = [run_measured(cli("keys", "list"), env) for _ in range(runs)]
        serve = [serve_once(env) for _ in range(serve_runs)]
    commit = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "label": label,
        "tree": str(tree),
        "commit": commit,
        "keys_list_loads_torch": loads_torch,
        "keys_list_wall_s": statistics.median(w for w, _, _ in keys),
        "keys_list_cpu_s": statistics.median(c for _, c, _ in keys),
        "keys_list_peak_rss_mib": statistics.median(r for _, _, r in keys),
        "serve_health_s": statistics.median(s for s, _, _ in serve),
        "serve_cpu_s": statistics.median(c for _, c, _ in serve),
        "serve_rss_mib": statistics.median(r for _, _, r in serve),
        "keys_list_runs": [{"wall_s": w, "cpu_s": c, "peak_rss_mib": r} for w, c, r in keys],
        "serve_runs": [{"health_s": s, "cpu_s": c, "rss_mib": r} for s, c, r in serve],
    }


def table(before: dict[str, Any], now: dict[str, Any]) -> str:
    rows = [
        ("`keys list`: wall time (median)", "keys_list_wall_s", "{:.2f} s"),
        ("`keys list`: CPU time, user + system (median)", "keys_list_cpu_s", "{:.2f} s"),
        ("`keys list`: peak RSS (median)", "keys_list_peak_rss_mib", "{:.0f} MiB"),
        ("`keys list` loads torch", "keys_list_loads_torch", "{}"),
        ("`serve --workers 0`: start until /health answers", "serve_health_s", "{:.2f} s"),
        ("`serve --workers 0`: CPU time until then", "serve_cpu_s", "{:.2f} s"),
        ("`serve --workers 0`: resident memory then", "serve_rss_mib", "{:.0f} MiB"),
    ]
    head = (
        f"| | before (`{before['commit']}`) | now (`{now['commit']}` + working tree) |\n"
        "| --- | ---: | ---: |"
    )
    body = [
        f"| {name} | {fmt.format(before[key])} | {fmt.format(now[key])} |"
        for name, key, fmt in rows
    ]
    return "\n".join([head, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, default=Path("/work/before"), help="old tree")
    parser.add_argument("--now", type=Path, default=ROOT, help="new tree (default: this one)")
    parser.add_argument("--runs", type=int, default=5, help="keys list runs per tree")
    parser.add_argument("--serve-runs", type=int, default=3, help="serve starts per tree")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args()

    before = measure_tree("before", args.before.resolve(), args.runs, args.serve_runs)
    now = measure_tree("now", args.now.resolve(), args.runs, args.serve_runs)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "before": before,
        "now": now,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(before, now))
    print(f"\nload average during the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
