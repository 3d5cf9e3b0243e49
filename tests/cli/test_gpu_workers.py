"""`auraserve worker --gpus` as a real process tree on a machine without a GPU: the hidden
AURASERVE_TEST_GPUS fakes the host's GPU list, the children run the tiny model on the CPU, and
each reports the CUDA_VISIBLE_DEVICES it was born with in its worker registration. A killed
child is restarted, a job runs on a pinned worker, SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from auraserve.config import Settings
from auraserve.core.jobs import JobStatus
from auraserve.runtime import Runtime
from auraserve.store import jobs, keys
from auraserve.store.workers import WorkerInfo, list_workers
from tests.cli.test_cli import run_cli
from tests.conftest import free_port
from tests.store_jobs import submit_job

MODEL = "auraflow-v0-3-512"


@pytest.fixture
def tree(tmp_path: Path, settings: Settings) -> Iterator[subprocess.Popen[str]]:
    env = dict(
        os.environ,
        AURASERVE_DATA_DIR=str(tmp_path / "gpu-host"),
        AURASERVE_DATABASE_URL=settings.database_url or settings.resolved_database_url,
        AURASERVE_TEST_GPUS="0,1",
        AURASERVE_STOP_GRACE_SECONDS="5",
        AURASERVE_HEARTBEAT_SECONDS="0.5",
        AURASERVE_POLL_INTERVAL_SECONDS="0.2",
    )
    command = [sys.executable, "-m", "auraserve", "worker", "--gpus", "all"]
    command += ["--model", "tiny", "--device", "cpu"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
        proc.wait(30)


def _live_by_gpu(
    rt: Runtime, count: int, *, not_pids: frozenset[int] = frozenset()
) -> dict[str, WorkerInfo]:
    """The registered, running workers by the GPU in their device, once `count` are there."""
    deadline = time.monotonic() + 300  # two processes import torch on a busy 2-core machine
    while True:
        found = {
            w.device.rsplit("GPU ", 1)[1]: w
            for w in list_workers(rt.db)
            if w.state in ("ready", "busy") and "GPU " in w.device and w.pid not in not_pids
        }
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, list_workers(rt.db)
        time.sleep(0.2)


def test_one_pinned_worker_per_gpu_restarted_and_stopped(
    tree: subprocess.Popen[str], runtime: Runtime
) -> None:
    workers = _live_by_gpu(runtime, 2)
    assert sorted(workers) == ["0", "1"]
    supervisor = psutil.Process(tree.pid)
    for gpu, worker in workers.items():
        child = psutil.Process(worker.pid)
        # Born pinned: the environment the process started with, not a value it was told.
        assert child.environ()["CUDA_VISIBLE_DEVICES"] == gpu
        assert child.ppid() == supervisor.pid
        assert worker.device == f"tiny (cpu, float32), GPU {gpu}"

    # A job runs on one of them.
    acct = keys.create_account(runtime.db, "g", credits=100_000)
    fields = {"prompt": "pinned", "steps": 2, "width": 512, "height": 512}
    job_id = submit_job(runtime.db, acct.account_id, fields, model=MODEL, max_queued=10)
    deadline = time.monotonic() + 120
    while (job := jobs.get(runtime.db, job_id)) is not None and not job.is_terminal:
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job is not None and job.status == JobStatus.COMPLETED

    # A crashed worker is started again on its GPU; its sibling is left alone.
    os.kill(workers["0"].pid, signal.SIGKILL)
    again = _live_by_gpu(runtime, 2, not_pids=frozenset({workers["0"].pid}))
    assert again["0"].pid != workers["0"].pid
    assert psutil.Process(again["0"].pid).environ()["CUDA_VISIBLE_DEVICES"] == "0"
    assert again["1"].pid == workers["1"].pid

    # SIGTERM stops every worker (each marks itself stopped) and the supervisor exits 0.
    tree.send_signal(signal.SIGTERM)
    out, _ = tree.communicate(timeout=60)
    assert tree.returncode == 0, out
    assert "exited with status -9" in out and "restarting" in out
    states = {w.pid: w.state for w in list_workers(runtime.db)}
    assert states[again["0"].pid] == "stopped" and states[workers["1"].pid] == "stopped"
    assert not psutil.pid_exists(again["0"].pid) or (
        psutil.Process(again["0"].pid).status() == psutil.STATUS_ZOMBIE
    )


def test_a_gpu_that_is_not_there_is_one_clear_line(settings: Settings) -> None:
    result = run_cli(
        "worker", "--gpus", "0,5", "--model", "tiny", "--device", "cpu",
        settings=settings,
        env={"AURASERVE_TEST_GPUS": "0,1"},
    )  # fmt: skip
    assert result.returncode != 0
    assert "--gpus 0,5: there is no GPU 5; this machine has 2 (0 to 1)" in result.stderr


def test_gpus_must_be_all_or_indices(settings: Settings) -> None:
    result = run_cli("worker", "--gpus", "first", settings=settings)
    assert result.returncode != 0
    assert "--gpus" in result.stderr and "0,1,3" in result.stderr


def test_serve_runs_one_worker_per_gpu_beside_the_api(
    tmp_path: Path, settings: Settings, runtime: Runtime
) -> None:
    port = free_port()
    env = dict(
        os.environ,
        AURASERVE_DATA_DIR=str(tmp_path / "serve"),
        AURASERVE_DATABASE_URL=settings.database_url or settings.resolved_database_url,
        AURASERVE_TEST_GPUS="0,1",
        AURASERVE_STOP_GRACE_SECONDS="5",
    )
    command = [sys.executable, "-m", "auraserve", "serve", "--gpus", "1", "--port", str(port)]
    command += ["--model", "tiny", "--device", "cpu"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        worker = _live_by_gpu(runtime, 1)["1"]
        assert psutil.Process(worker.pid).environ()["CUDA_VISIBLE_DEVICES"] == "1"
        admin = keys.create_account(runtime.db, "ops", is_admin=True, credits=100_000)
        headers = {"Authorization": f"Bearer {admin.key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    listed = client.get("/v2/workers")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.2)
            (row,) = [w for w in listed.json()["workers"] if w["state"] in ("ready", "busy")]
            # Ready once a GPU worker has warmed up (it has: it is registered as ready).
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"]["workers"]["ok"], ready.text
            assert row["device"] == "tiny (cpu, float32), GPU 1" and row["pid"] == worker.pid
            body = {"prompt": "served", "steps": 2}
            sent = client.post(f"/{MODEL}/v1/auraflow-v0-3-request", json=body)
            assert sent.status_code == 202, sent.text
            status_url = f"/v2/requests/status/{sent.json()['request_id']}"
            deadline = time.monotonic() + 120
            while (status := client.get(status_url).json())["status"] in ("QUEUED", "PROCESSING"):
                assert time.monotonic() < deadline, status
                time.sleep(0.2)
            assert status["status"] == "COMPLETED", status
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert not any(w.state in ("ready", "busy") for w in list_workers(runtime.db))
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait(30)
