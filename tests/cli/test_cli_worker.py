"""`auraserve worker` as an operator runs it: a real subprocess on the tiny model, with its own
data dir (as on another machine) over the shared store, stopped by signals; `auraserve
workers` lists it; `keys create --admin` makes the operator's key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from auraserve.config import Settings
from auraserve.core.jobs import Job, JobStatus
from auraserve.runtime import Runtime
from auraserve.store import jobs, keys, ledger
from tests.cli.test_cli import run_cli
from tests.store_jobs import submit_job

MODEL = "auraflow-v0-3-512"


@contextmanager
def _worker(
    tmp_path: Path, settings: Settings, worker_id: str, grace: float, *extra: str
) -> Iterator[subprocess.Popen[str]]:
    env = dict(
        os.environ,
        AURASERVE_DATA_DIR=str(tmp_path / worker_id),  # its own disk, like another machine
        AURASERVE_DATABASE_URL=settings.database_url or settings.resolved_database_url,
        AURASERVE_WORKER_ID=worker_id,
        AURASERVE_STOP_GRACE_SECONDS=str(grace),
        AURASERVE_HEARTBEAT_SECONDS="0.5",
        AURASERVE_LEASE_SECONDS="30",
        AURASERVE_POLL_INTERVAL_SECONDS="0.2",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "auraserve", "worker", "--model", "tiny", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if f"worker {worker_id} ready" in line:
                break
        else:
            raise AssertionError(f"worker exited with {proc.wait()} before it was ready")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _serve(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """`auraserve serve ARGV` in a process of its own, returned once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "auraserve", "serve", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line:
            return proc
    raise AssertionError(f"serve exited with {proc.wait()} before it listened")


def _submit(rt: Runtime, account_id: str, *, steps: int, size: int, **extra: Any) -> str:
    fields = {"prompt": "stop me", "steps": steps, "width": size, "height": size, **extra}
    return submit_job(rt.db, account_id, fields, model=MODEL, max_queued=10)


def _in_hand(rt: Runtime, job_id: str, timeout: float = 120) -> None:
    """Until the worker has the job and ran a first step: the batch is really in hand."""
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.get(rt.db, job_id)
        if job is not None and job.status == JobStatus.PROCESSING and job.progress_step >= 1:
            return
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def _until(rt: Runtime, job_id: str, done: Any, timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.get(rt.db, job_id)
        assert job is not None
        if done(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def _exit(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_sigterm_lets_the_batch_in_hand_finish_within_the_grace(
    tmp_path: Path, settings: Settings, runtime: Runtime
) -> None:
    acct = keys.create_account(runtime.db, "w", credits=100_000)
    with _worker(tmp_path, settings, "gpu-a", grace=300) as proc:
        listed = run_cli("workers", "--json", settings=settings)
        assert listed.returncode == 0, listed.stderr
        (row,) = [w for w in json.loads(listed.stdout)["workers"] if w["id"] == "gpu-a"]
        assert row["liveness"] == "live" and MODEL in row["models"] and row["pid"] == proc.pid

        job_id = _submit(runtime, acct.account_id, steps=4, size=512)
        _in_hand(runtime, job_id)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, out = _exit(proc, 300)
        took = time.monotonic() - signalled
    job = jobs.get(runtime.db, job_id)
    assert job is not None and job.status == JobStatus.COMPLETED, (job, out)
    assert code == 0, out
    assert "stopping: no new jobs" in out
    print(f"SIGTERM -> batch finished and worker exited in {took:.1f} s")
    kinds = [e["kind"] for e in ledger.entries(runtime.db, acct.account_id)]
    assert kinds.count("capture") == 1 and "release" not in kinds

    table = run_cli("workers", settings=settings)
    assert table.returncode == 0, table.stderr
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("gpu-a"))
    assert "stopped" in line.split()


def test_past_a_tiny_grace_the_job_goes_back_queued_with_its_attempt(
    tmp_path: Path, settings: Settings, runtime: Runtime
) -> None:
    acct = keys.create_account(runtime.db, "w", credits=100_000)
    with _worker(tmp_path, settings, "gpu-b", grace=0.5) as proc:
        job_id = _submit(runtime, acct.account_id, steps=60, size=512)  # a minute or more
        _in_hand(runtime, job_id)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        job = _until(runtime, job_id, lambda j: j.status != JobStatus.PROCESSING, timeout=30)
        handed_back = time.monotonic() - signalled
        code, out = _exit(proc, 60)
        exited = time.monotonic() - signalled
    print(f"grace 0.5 s: handed back after {handed_back:.2f} s, exited after {exited:.2f} s")
    assert job.status == JobStatus.QUEUED and job.attempts == 0 and job.lease_owner is None
    assert handed_back < 5.0
    assert code == 0, out
    # Nothing charged or refunded: the reservation waits for the job's next (first) attempt.
    kinds = [e["kind"] for e in ledger.entries(runtime.db, acct.account_id)]
    assert kinds == ["grant", "reserve"]


def test_a_second_sigterm_hands_back_at_once_and_exits(
    tmp_path: Path, settings: Settings, runtime: Runtime
) -> None:
    acct = keys.create_account(runtime.db, "w", credits=100_000)
    with _worker(tmp_path, settings, "gpu-c", grace=300) as proc:
        job_id = _submit(runtime, acct.account_id, steps=60, size=512)
        _in_hand(runtime, job_id)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        second = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        job = _until(runtime, job_id, lambda j: j.status != JobStatus.PROCESSING, timeout=30)
        handed_back = time.monotonic() - second
        code, out = _exit(proc, 60)
        exited = time.monotonic() - second
    print(f"second SIGTERM: handed back after {handed_back:.2f} s, exited after {exited:.2f} s")
    assert job.status == JobStatus.QUEUED and job.attempts == 0
    assert handed_back < 3.0
    assert exited < 30.0  # the engine finishes the step it is in, then the process exits
    assert code == 0, out
    assert "handing the batch in hand back to the queue now" in out


@pytest.mark.parametrize("mode", ["cfg=2", "ulysses=2"])
def test_parallel_worker_serves_jobs_and_a_dead_rank_hands_the_batch_back(
    tmp_path: Path, settings: Settings, runtime: Runtime, mode: str
) -> None:
    """`worker --parallel cfg=2` (rows) or `ulysses=2` (tokens): rank 0 claims and settles,
    both ranks compute, the served image is the one-process image; when the other rank dies
    mid-batch, the job goes back to the queue uncharged and the worker exits 1 for its
    supervisor."""
    done_acct = keys.create_account(runtime.db, "p1", credits=100_000)
    lost_acct = keys.create_account(runtime.db, "p2", credits=100_000)
    extra = ("--device", "cpu", "--parallel", mode)
    worker_id = "gpu-p" + mode.replace("=", "")
    with _worker(tmp_path, settings, worker_id, 300, *extra) as proc:
        (follower,) = [
            child
            for child in psutil.Process(proc.pid).children()
            if "resource_tracker" not in " ".join(child.cmdline())
        ]
        job_id = _submit(
            runtime, done_acct.account_id, steps=2, size=512, seed=21, output_format="png",
            sampler="euler_ancestral",
        )  # fmt: skip
        job = _until(runtime, job_id, lambda j: j.status != JobStatus.PROCESSING and
                     j.status != JobStatus.QUEUED, timeout=120)  # fmt: skip
        assert job.status == JobStatus.COMPLETED, job
        kinds = [e["kind"] for e in ledger.entries(runtime.db, done_acct.account_id)]
        assert kinds.count("capture") == 1
        _assert_one_process_image(settings, job, tmp_path / worker_id / "media")
        # A client's cancel stops every rank at the same step: the group serves on.
        cancel_id = _submit(runtime, done_acct.account_id, steps=60, size=512)
        _in_hand(runtime, cancel_id)
        jobs.cancel(runtime.db, cancel_id, account_id=done_acct.account_id)
        job = _until(runtime, cancel_id, lambda j: j.status == JobStatus.CANCELLED, timeout=60)
        again = _submit(runtime, done_acct.account_id, steps=2, size=512)
        job = _until(runtime, again, lambda j: j.status == JobStatus.COMPLETED, timeout=60)

        lost_id = _submit(runtime, lost_acct.account_id, steps=60, size=512)
        _in_hand(runtime, lost_id)
        follower.kill()
        job = _until(runtime, lost_id, lambda j: j.status != JobStatus.PROCESSING, timeout=60)
        code, out = _exit(proc, 60)
    assert job.status == JobStatus.QUEUED and job.attempts == 0 and job.lease_owner is None
    assert code == 1, out
    assert "a rank of the parallel group died" in out
    kinds = [e["kind"] for e in ledger.entries(runtime.db, lost_acct.account_id)]
    assert kinds == ["grant", "reserve"]


def _assert_one_process_image(settings: Settings, job: Job, media: Path) -> None:
    import io

    import numpy as np
    from PIL import Image

    from auraserve.cli.engine import load_models
    from auraserve.media.storage import LocalMediaStore

    assert job.output is not None
    (name,) = job.output["media"]
    data = LocalMediaStore(media).get(name)
    assert data is not None
    served = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    engine = load_models(settings.model_copy(update={"device": "cpu"}), [MODEL])
    (result,) = engine.generate([job.request])
    alone = np.asarray(result.images[0].convert("RGB"), np.int16)
    assert np.abs(served - alone).max() <= 1


def test_keys_create_admin_makes_an_operator_account(settings: Settings) -> None:
    made = run_cli(
        "keys", "create", "--name", "ops", "--admin", "--json", "--create", settings=settings
    )
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    assert record["admin"] is True
    rt = Runtime.open(settings)
    try:
        account = keys.authenticate(rt.db, record["key"])
        assert account is not None and account.is_admin
        plain = keys.create_account(rt.db, "user")
        assert not keys.authenticate(rt.db, plain.key).is_admin  # type: ignore[union-attr]
    finally:
        rt.close()
    refused = run_cli(
        "keys", "create", "--name", "x", "--account", record["account_id"], "--admin",
        settings=settings,
    )  # fmt: skip
    assert refused.returncode == 2 and "--admin makes a new admin account" in refused.stderr
    empty = run_cli("workers", settings=settings)
    assert empty.returncode == 0 and "no workers have registered" in empty.stderr


def test_serve_sigterm_ends_streams_hands_back_its_batch_and_exits_0(
    tmp_path: Path, settings: Settings, runtime: Runtime
) -> None:
    """`serve` with its in-process worker: the same stop through uvicorn's signal handling."""
    import threading

    import httpx

    from tests.conftest import free_port

    acct = keys.create_account(runtime.db, "w", credits=100_000)
    headers = {"x-api-key": acct.key}
    port = free_port()
    env = dict(
        os.environ,
        AURASERVE_DATA_DIR=str(tmp_path / "serve"),
        AURASERVE_DATABASE_URL=settings.database_url or settings.resolved_database_url,
        AURASERVE_STOP_GRACE_SECONDS="0.5",
        AURASERVE_POLL_INTERVAL_SECONDS="0.2",
    )
    proc = _serve(["--model", "tiny", "--port", str(port)], env)
    try:
        job_id = _submit(runtime, acct.account_id, steps=60, size=512)
        _in_hand(runtime, job_id)
        request_id = f"{MODEL}_{job_id}"
        base = f"http://127.0.0.1:{port}"
        ended = threading.Event()

        def follow() -> None:
            url = f"{base}/v2/requests/status/{request_id}/stream"
            with httpx.stream("GET", url, headers=headers, timeout=60) as resp:
                for _ in resp.iter_lines():
                    pass
            ended.set()

        threading.Thread(target=follow, daemon=True).start()
        time.sleep(1.0)  # the stream is open
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert ended.wait(10), "the status stream held the shutdown"
        job = _until(runtime, job_id, lambda j: j.status != JobStatus.PROCESSING, timeout=30)
        handed_back = time.monotonic() - signalled
        code, out = _exit(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    print(f"serve, grace 0.5 s: handed back after {handed_back:.2f} s")
    assert job.status == JobStatus.QUEUED and job.attempts == 0
    assert code == 0, out


def test_serve_parallel_serves_jobs_and_a_dead_rank_stops_it_with_the_batch_handed_back(
    tmp_path: Path, settings: Settings, runtime: Runtime
) -> None:
    from tests.conftest import free_port

    done_acct = keys.create_account(runtime.db, "s1", credits=100_000)
    lost_acct = keys.create_account(runtime.db, "s2", credits=100_000)
    env = dict(
        os.environ,
        AURASERVE_DATA_DIR=str(tmp_path / "serve-p"),
        AURASERVE_DATABASE_URL=settings.database_url or settings.resolved_database_url,
        AURASERVE_STOP_GRACE_SECONDS="300",
        AURASERVE_POLL_INTERVAL_SECONDS="0.2",
    )
    port = str(free_port())
    argv = ["--model", "tiny", "--port", port, "--device", "cpu", "--parallel", "cfg=2"]
    proc = _serve(argv, env)
    try:
        (follower,) = [
            child
            for child in psutil.Process(proc.pid).children()
            if "resource_tracker" not in " ".join(child.cmdline())
        ]
        job_id = _submit(runtime, done_acct.account_id, steps=2, size=512)
        job = _until(runtime, job_id, lambda j: j.status in _ENDED, timeout=120)
        assert job.status == JobStatus.COMPLETED, job
        lost_id = _submit(runtime, lost_acct.account_id, steps=60, size=512)
        _in_hand(runtime, lost_id)
        follower.kill()
        job = _until(runtime, lost_id, lambda j: j.status != JobStatus.PROCESSING, timeout=60)
        code, out = _exit(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert job.status == JobStatus.QUEUED and job.attempts == 0 and job.lease_owner is None
    assert code == 1, out
    assert "a rank of the parallel group died" in out
    assert [e["kind"] for e in ledger.entries(runtime.db, lost_acct.account_id)] == [
        "grant",
        "reserve",
    ]


_ENDED = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.ERROR, JobStatus.CANCELLED}
