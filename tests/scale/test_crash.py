"""The crash test (issue 9, point 10): a deployment as on many machines, abused while it works.

Two API processes (`auraserve serve --workers 0`) and three workers (`auraserve worker`), each
with its own data dir, share only PostgreSQL, an S3 bucket (moto's standalone server) and the
server key. Clients send a few hundred jobs in all three dialects to both API processes, the
queue ones with webhooks to an HTTPS receiver. Meanwhile the test SIGKILLs a worker in the
middle of a job and restarts it (twice), SIGTERMs another, terminates every database
connection once and SIGKILLs and restarts an API process. Clients retry connection errors and
503s with the same `Idempotency-Key` (the service replays the first submit for the same key and
body instead of making a second job: docs/api.md, Idempotency). A few sync clients of their own
account send no key at all and do what a 503 says (docs/api.md): resend one that names no
request, fetch the one it names; none of them may pay twice (issue 18).

Afterwards the test prints a summary and checks that nothing was lost or charged twice: every
job has one terminal status; every COMPLETED job's images come back through its `media_url`
and it has exactly one capture; every other job exactly one release; every balance equals its
ledger; every terminal webhook arrived, signed, with a stable `webhook-id`; and after the orphan
sweep the bucket holds exactly the images jobs own.

PostgreSQL only: SQLite is one machine's store, and this test is about many machines.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from auraserve.config import load_settings
from auraserve.core.presets import default_presets
from tests.conftest import BACKEND, PG_ADMIN_URL
from tests.s3_server import S3Server, start_s3_server
from tests.scale.harness import (
    TERMINAL,
    Account,
    Cluster,
    Report,
    Store,
    Submission,
    WebhookReceiver,
    group_by,
    sample,
)

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(
        BACKEND != "postgresql",
        reason="the crash test runs API replicas and workers on many 'machines', which share "
        "PostgreSQL and S3; it runs in the AURASERVE_TEST_BACKEND=postgresql pass",
    ),
]

# The load: >= 200 jobs over the three dialects (the queue ones with webhooks).
QUEUE_JOBS = 140
SYNC_JOBS = 35
OPENAI_JOBS = 35
# Sync requests without an Idempotency-Key, on an account of their own (the last one).
UNKEYED_SYNC_JOBS = 12
ACCOUNTS = 3
CREDITS = 100_000
CLIENT_THREADS = 24
SUBMIT_INTERVAL = 0.15  # seconds between new submissions, so the faults hit a load in motion
# An operator preset as deployments define their own: 512x512 at one step, so the tiny model
# spends CI's two cores on the service rather than on denoising. OpenAI clients name it in
# `model`; the queue and sync dialects use the stock presets with explicit fields.
CRASH_PRESET = "auraflow-crash"
PROMPT = "a lighthouse at dusk"  # one prompt: the workers' text cache spares the encoder

# A few queue jobs run many steps, so a worker killed mid-job holds one past a step checkpoint
# and the test can count the steps its successor runs again (and those it was spared).
LONG_JOB_EVERY = 10  # every 10th queue job
LONG_JOB_STEPS = 20
CHECKPOINT_SECONDS = 0.5

# Short enough that rescues happen in seconds, long enough that a worker starved of CPU by its
# neighbours (three workers, two API processes and the clients share two cores) keeps its jobs.
LEASE_SECONDS = 8.0
RUN_DEADLINE = 600.0  # seconds for the whole load, faults included (CI target: under 240)
STALL_SECONDS = 60.0  # past the deadline, the longest wait for the next job to finish


def _env(
    database_url: str, s3: S3Server, bucket: str, receiver: WebhookReceiver, secret_key: str
) -> dict[str, str]:
    presets = {name: p.model_dump() for name, p in default_presets().items()}
    presets[CRASH_PRESET] = {
        **presets["auraflow-v0-3-512"],
        "description": "crash test: 512x512, one step",
        "steps": 1,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("AURASERVE_")}
    env.update(
        {
            "AURASERVE_DATABASE_URL": database_url,
            "AURASERVE_SECRET_KEY": secret_key,
            "AURASERVE_PRESETS": json.dumps(presets),
            # Short leases and sweeps, so that recovery happens in seconds.
            "AURASERVE_LEASE_SECONDS": str(LEASE_SECONDS),
            "AURASERVE_HEARTBEAT_SECONDS": "1",
            "AURASERVE_POLL_INTERVAL_SECONDS": "0.2",
            "AURASERVE_SWEEP_INTERVAL_SECONDS": "1",
            "AURASERVE_WORKER_STALE_SECONDS": "5",
            "AURASERVE_STOP_GRACE_SECONDS": "5",
            "AURASERVE_MAX_ATTEMPTS": "4",
            "AURASERVE_MAX_BATCH": "2",
            # Step checkpoints often enough that the long jobs below hold one when a worker dies.
            "AURASERVE_CHECKPOINT_SECONDS": str(CHECKPOINT_SECONDS),
            # Limits that would only slow a test that sends everything from one client.
            "AURASERVE_MAX_QUEUED_PER_ACCOUNT": "1000",
            "AURASERVE_RATE_LIMIT_PER_MINUTE": "0",
            "AURASERVE_SYNC_TIMEOUT_SECONDS": "120",
            # Webhooks to the loopback receiver, trusted through the test CA, retried quickly.
            "AURASERVE_WEBHOOK_ALLOW_HOSTS": "127.0.0.1,localhost",
            "AURASERVE_WEBHOOK_SCHEDULE": "0,0.5,1,1,2,2,3,3,5,5",
            "AURASERVE_WEBHOOK_TIMEOUT_SECONDS": "5",
            "SSL_CERT_FILE": str(receiver.ca_file),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **s3.environment_for(bucket, "crash"),
        }
    )
    return env


def _submissions(accounts: list[Account], receiver: WebhookReceiver) -> list[Submission]:
    rng = random.Random(9)
    kinds = ["queue"] * QUEUE_JOBS + ["sync"] * SYNC_JOBS + ["openai"] * OPENAI_JOBS
    kinds += ["unkeyed"] * UNKEYED_SYNC_JOBS
    rng.shuffle(kinds)
    subs = []
    for i, kind in enumerate(kinds):
        account = accounts[i % ACCOUNTS]
        if kind == "unkeyed":
            subs.append(
                Submission(
                    index=i,
                    dialect="sync",
                    account=accounts[ACCOUNTS],
                    idempotency_key=None,
                    home=0,  # the API process no fault kills
                    method="POST",
                    path="/v1/aura-flow",
                    headers={"x-api-key": accounts[ACCOUNTS].key},
                    form={
                        "prompt": PROMPT,
                        "steps": "1",
                        "width": "512",
                        "height": "512",
                        "seed": str(i),
                        "output_format": "png",
                    },
                )
            )
            continue
        common: dict[str, Any] = {
            "index": i,
            "dialect": kind,
            "account": account,
            "idempotency_key": f"crash-{i}-{secrets.token_hex(4)}",
            "home": i % 2,
            "method": "POST",
        }
        if kind == "queue":
            # Seed 002: the gateway path, its key header and its webhook header.
            subs.append(
                Submission(
                    **common,
                    path="/auraflow-v0-3-512/v1/auraflow-v0-3-request",
                    headers={
                        "Ocp-Apim-Subscription-Key": account.key,
                        "X-Webhook-URL": receiver.url(account.account_id),
                    },
                    json_body={
                        "prompt": PROMPT,
                        "num_inference_steps": LONG_JOB_STEPS if i % LONG_JOB_EVERY == 5 else 1,
                        "seed": i,
                        "num_images": 2 if i % 10 == 0 else 1,
                    },
                )
            )
        elif kind == "sync":
            # Seed 000: form data, x-api-key, image bytes back.
            subs.append(
                Submission(
                    **common,
                    path="/v1/aura-flow",
                    headers={"x-api-key": account.key},
                    form={
                        "prompt": PROMPT,
                        "steps": "1",
                        "width": "512",
                        "height": "512",
                        "seed": str(i),
                        "output_format": "png",
                    },
                )
            )
        else:
            subs.append(
                Submission(
                    **common,
                    path="/v1/images/generations",
                    headers={"Authorization": f"Bearer {account.key}"},
                    json_body={
                        "model": CRASH_PRESET,
                        "prompt": PROMPT,
                        "size": "512x512",
                        "response_format": "url",
                        "seed": i,
                    },
                )
            )
    return subs


class Faults:
    """The faults, each at a point of the run (a share of the jobs finished), so they land
    while work is in flight however fast the machine is."""

    def __init__(
        self, cluster: Cluster, store: Store, report: Report, total: int, worker_ids: list[str]
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.report = report
        self.total = total
        self.worker_ids = worker_ids
        self.killed_jobs: list[str] = []
        # Jobs that held a step checkpoint when their worker was killed: id -> (steps done by
        # then as the job's progress showed, the checkpoint's step, steps per second so far).
        self.checkpointed_at_kill: dict[str, tuple[int, int, float]] = {}
        self.sigterm_rc: int | None = None
        self.sigterm_left: list[str] = []
        self.terminated_connections = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._wait_share(0.10)
            self.kill_worker_mid_job(0)
            self._wait_share(0.25)
            self.terminate_database_connections()
            self._wait_share(0.40)
            self.kill_worker_mid_job(1)
            self._wait_share(0.50)
            self.kill_api(1)
            self._wait_share(0.65)
            self.sigterm_worker(2)
        except BaseException as exc:  # reported by the test, with the logs
            self.error = exc
            self.report.event(f"fault script failed: {exc!r}")

    def _wait_share(self, share: float) -> None:
        deadline = time.monotonic() + RUN_DEADLINE
        while self.store.terminal_count() < share * self.total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"never reached {share:.0%} of the jobs finished")
            time.sleep(0.1)

    def kill_worker_mid_job(self, index: int) -> None:
        # Better than worker `index`: whichever of the first two holds a long job past a step
        # checkpoint (the short jobs never reach one), if one does within 30 s.
        progress: dict[str, tuple[int, int, float]] = {}
        patience = time.monotonic() + 30
        while time.monotonic() < patience and not progress:
            for candidate in (index, 1 - index):
                progress = self._checkpointed(self.worker_ids[candidate])
                if progress:
                    index = candidate
                    break
            else:
                time.sleep(0.05)
        worker = self.cluster.workers[index]
        wid = self.worker_ids[index]
        deadline = time.monotonic() + 60
        while not (held := self.store.leased_by(wid)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {wid} never held a job")
            time.sleep(0.02)
        worker.send(signal.SIGKILL)
        rc = worker.wait(10)
        self.killed_jobs += held
        # The progress read just before the kill may trail the worker by a write: read the
        # checkpoints again now that it is dead (they are what the next worker resumes from).
        for job_id, (done, _, rate) in progress.items():
            step = self.store.scalar(
                "SELECT coalesce(max(step), 0) FROM job_checkpoints WHERE job_id = :j", j=job_id
            )
            self.checkpointed_at_kill[job_id] = (done, int(step), rate)
        self.report.event(
            f"SIGKILL worker{index} ({wid}, rc {rc}) holding {sample(held)}; checkpoints at "
            f"kill (steps done, checkpoint step): "
            f"{ {j: v[:2] for j, v in self.checkpointed_at_kill.items() if j in progress} }"
        )
        worker.start()
        self.worker_ids[index] = self.cluster.worker_id(index)
        self.report.event(f"worker{index} restarted as {self.worker_ids[index]}")

    def _checkpointed(self, worker_id: str) -> dict[str, tuple[int, int, float]]:
        """The jobs `worker_id` runs that hold a checkpoint: their steps done, checkpoint step
        and steps per second since they started."""
        rows = self.store.rows(
            "SELECT j.id, j.progress_step, c.step, extract(epoch FROM now()) - j.started_at "
            "AS running FROM jobs j JOIN job_checkpoints c ON c.job_id = j.id "
            # Some way in (a checkpoint past step 5), so the steps spared are worth counting.
            "WHERE j.status = 'PROCESSING' AND j.lease_owner = :w AND c.worker_id = :w "
            "AND c.step >= 5",
            w=worker_id,
        )
        return {
            r.id: (int(r.progress_step), int(r.step), r.progress_step / max(float(r.running), 1e-3))
            for r in rows
        }

    def terminate_database_connections(self) -> None:
        self.terminated_connections = self.store.terminate_connections(PG_ADMIN_URL)
        self.report.event(f"pg_terminate_backend: {self.terminated_connections} connection(s)")

    def kill_api(self, index: int) -> None:
        api = self.cluster.apis[index]
        api.send(signal.SIGKILL)
        rc = api.wait(10)
        self.report.event(f"SIGKILL api{index} (rc {rc})")
        api.start()
        self.cluster.wait_api(index)
        self.report.event(f"api{index} restarted")

    def sigterm_worker(self, index: int) -> None:
        worker = self.cluster.workers[index]
        wid = self.worker_ids[index]
        deadline = time.monotonic() + 60
        while not (held := self.store.leased_by(wid)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {wid} never held a job")
            time.sleep(0.02)
        worker.send(signal.SIGTERM)
        self.sigterm_rc = worker.wait(60)
        # A graceful stop finishes or hands back what it holds: nothing stays leased to it.
        self.sigterm_left = self.store.leased_by(wid)
        self.report.event(
            f"SIGTERM worker{index} ({wid}) holding {sample(held)}: exit {self.sigterm_rc}, "
            f"still leased to it {self.sigterm_left}"
        )
        worker.start()  # a rolling restart: the deployment keeps its three workers
        self.worker_ids[index] = self.cluster.worker_id(index)
        self.report.event(f"worker{index} restarted as {self.worker_ids[index]}")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "crash"
    path.mkdir()
    return path


def test_nothing_is_lost_or_charged_twice_when_processes_and_the_database_fail(
    workdir: Path, database_url: str
) -> None:
    from auraserve.runtime import Runtime
    from auraserve.store import keys

    # moto's server runs in this process and logs every request through werkzeug.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    report = Report()
    s3 = start_s3_server()
    receiver = WebhookReceiver(workdir)
    secret_key = secrets.token_hex(32)
    cluster: Cluster | None = None
    runtime: Runtime | None = None
    store = Store(database_url)
    try:
        bucket = s3.make_bucket()
        receiver.start()
        env = _env(database_url, s3, bucket, receiver, secret_key)
        cluster = Cluster(workdir, env)
        # The test's own view of the deployment: the same store, bucket and server key.
        settings = load_settings(
            data_dir=workdir / "test",
            database_url=database_url,
            secret_key=secret_key,
            **s3.settings_for(bucket, "crash"),
        )
        runtime = Runtime.open(settings)
        accounts = []
        for n in range(ACCOUNTS + 1):  # the last one: the unkeyed clients'
            created = keys.create_account(runtime.db, f"crash-{n}", credits=CREDITS)
            accounts.append(Account(created.account_id, created.key, created.webhook_secret))
            receiver.secrets[created.account_id] = created.webhook_secret

        for _ in range(2):
            cluster.add_api().start()
        for _ in range(3):
            cluster.add_worker().start()
        for i in range(2):
            cluster.wait_api(i)
        worker_ids = [cluster.worker_id(i) for i in range(3)]
        report.event(f"cluster up: 2 API processes, workers {worker_ids}")

        subs = _submissions(accounts, receiver)
        faults = Faults(cluster, store, report, len(subs), worker_ids)
        fault_thread = threading.Thread(target=faults.run, name="faults", daemon=True)
        run_started = time.monotonic()
        deadline = run_started + RUN_DEADLINE
        fault_thread.start()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            futures = []
            for sub in subs:
                futures.append(pool.submit(sub.send, lambda: cluster.api_urls, deadline))
                time.sleep(SUBMIT_INTERVAL)
            for future in futures:
                future.result()
        report.event("every client has its answer")
        fault_thread.join(max(1.0, deadline - time.monotonic()))
        _wait_until_all_terminal(store, deadline)
        report.event("every job is terminal")
        report.facts["load seconds (submit to last terminal)"] = round(
            time.monotonic() - run_started, 1
        )
        _wait_for_webhooks(store, deadline + 60)
        report.event("the outbox is drained")

        _check_faults(report, faults, store)
        _check_answers(report, subs, store)
        _check_jobs_and_money(report, store, accounts, subs, set(faults.killed_jobs))
        _check_media(report, store, runtime, cluster, accounts, subs)
        _check_webhooks(report, store, receiver)
    except BaseException:
        report.event("the test stopped on an exception (see the traceback)")
        if cluster is not None:
            print(cluster.logs())
        print(report.summary())
        (workdir / "summary.txt").write_text(report.summary())
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        receiver.stop()
        s3.stop()
        if runtime is not None:
            runtime.close()
        store.dispose()
    print(report.summary())
    (workdir / "summary.txt").write_text(report.summary())
    if report.failed:
        assert cluster is not None
        print(cluster.logs())
    assert not report.failed, "failed checks: " + "; ".join(
        f"{c.name}: {c.detail}" for c in report.failed
    )


def _wait_until_all_terminal(store: Store, deadline: float) -> None:
    """Until no job is open. Past `deadline`, wait on while jobs keep finishing (a slow,
    shared machine), and fail once none has finished for STALL_SECONDS: then something is stuck."""
    last_open, last_change = -1, time.monotonic()
    while True:
        open_jobs = store.rows(
            "SELECT id, status FROM jobs WHERE status IN ('QUEUED', 'PROCESSING')"
        )
        if not open_jobs:
            return
        if len(open_jobs) != last_open:
            last_open, last_change = len(open_jobs), time.monotonic()
        now = time.monotonic()
        if now > deadline and now - last_change > STALL_SECONDS:
            raise AssertionError(f"{len(open_jobs)} job(s) never finished: {sample(open_jobs)}")
        time.sleep(0.2)


def _wait_for_webhooks(store: Store, deadline: float) -> None:
    while True:
        pending = store.rows(
            "SELECT event_id, state, attempts FROM webhook_deliveries "
            "WHERE terminal AND state = 'pending'"
        )
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(pending)} terminal webhook(s) never delivered: {sample(pending)}"
            )
        time.sleep(0.2)


def _check_resumed(report: Report, faults: Faults, store: Store) -> None:
    """Step checkpoints: a job killed past a checkpoint resumed from it, so its successor ran
    again at most the steps of one checkpoint interval, not every step done."""
    killed = faults.checkpointed_at_kill
    report.check("a SIGKILLed worker held a job past a step checkpoint", bool(killed), "")
    if not killed:
        return
    rows = {
        r.id: r
        for r in store.rows(
            "SELECT id, status, attempts, progress_resumed_from FROM jobs WHERE id = ANY(:ids)",
            ids=list(killed),
        )
    }
    rerun_total = spared_total = 0
    for job_id, (done, checkpoint, rate) in killed.items():
        row = rows[job_id]
        resumed = row.progress_resumed_from
        if row.attempts > 2:  # killed again later: the last attempt's mark says nothing of this one
            continue
        # Steps run in one checkpoint interval at the rate this job ran, plus one for the
        # step in flight and one for a progress write that trailed the worker.
        bound = int(CHECKPOINT_SECONDS * rate) + 2
        rerun = done - (resumed or 0)
        rerun_total += max(rerun, 0)
        spared_total += resumed or 0
        report.check(
            f"job {job_id[:8]} resumed from its checkpoint (killed at step {done}, checkpoint "
            f"{checkpoint}, resumed from {resumed}); steps run again {rerun} <= one interval "
            f"({bound})",
            row.status == "COMPLETED"
            and resumed is not None
            and resumed >= checkpoint
            and rerun <= bound,
            f"status {row.status}, attempts {row.attempts}",
        )
    report.facts["steps run again after kills (with checkpoints)"] = rerun_total
    report.facts["steps spared by checkpoints (run again without them)"] = spared_total


def _check_faults(report: Report, faults: Faults, store: Store) -> None:
    report.check("fault script ran to the end", faults.error is None, repr(faults.error))
    report.facts["jobs held by SIGKILLed workers"] = len(faults.killed_jobs)
    report.facts["database connections terminated"] = faults.terminated_connections
    report.check("the SIGKILLed workers held jobs when they died", len(faults.killed_jobs) >= 2, "")
    report.check(
        "pg_terminate_backend cut connections of the deployment",
        faults.terminated_connections >= 5,
        f"{faults.terminated_connections} terminated",
    )
    report.check(
        "SIGTERM: the worker exits 0 and leaves no job leased to it",
        faults.sigterm_rc == 0 and not faults.sigterm_left,
        f"exit {faults.sigterm_rc}, still leased {faults.sigterm_left}",
    )
    _check_resumed(report, faults, store)
    if faults.killed_jobs:
        rows = store.rows(
            "SELECT id, status, attempts FROM jobs WHERE id = ANY(:ids)", ids=faults.killed_jobs
        )
        report.facts["jobs of killed workers (status, attempts)"] = dict(
            Counter((r.status, r.attempts) for r in rows)
        )
        report.check(
            "jobs of the killed workers were rescued and finished",
            all(r.status in TERMINAL and r.attempts >= 2 for r in rows),
            sample(r for r in rows if not (r.status in TERMINAL and r.attempts >= 2)),
        )


def _check_answers(report: Report, subs: list[Submission], store: Store) -> None:
    report.facts["submissions"] = dict(Counter(s.dialect for s in subs))
    report.facts["retried submissions"] = sum(s.retried for s in subs)
    report.facts["client attempts by outcome"] = dict(Counter(t for s in subs for t in s.tries))
    report.facts["final answers"] = dict(Counter((s.dialect, s.status_code) for s in subs))
    slow = sorted(s.seconds for s in subs)
    report.facts["client seconds p50 / max"] = (
        round(slow[len(slow) // 2], 2),
        round(slow[-1], 2),
    )
    report.check(
        "every client got an answer that names its request",
        all(s.request_id for s in subs),
        sample((s.index, s.dialect, s.tries) for s in subs if not s.request_id),
    )
    # The first answers must agree with the store: 202 for queue submits, the image for sync
    # requests of completed jobs, an error naming the request otherwise.
    jobs = {
        f"{r.model_id}_{r.id}": r.status
        for r in store.rows("SELECT id, model_id, status FROM jobs")
    }
    disagree = []
    for s in subs:
        status = jobs.get(s.request_id or "")
        if s.dialect == "queue":
            ok = s.status_code == 202
        else:
            ok = (s.status_code == 200) == (status == "COMPLETED")
        if not ok or status is None:
            disagree.append((s.index, s.dialect, s.status_code, status, s.tries[-3:]))
    report.check("client answers agree with the store", not disagree, sample(disagree))
    unexpected_500 = [(s.index, s.dialect, s.tries) for s in subs if "500" in s.tries]
    report.facts["submissions that saw a 500"] = len(unexpected_500)
    bad_images = [
        s.index
        for s in subs
        if s.dialect == "sync" and s.status_code == 200 and not s.content.startswith(b"\x89PNG")
    ]
    report.check("sync answers are PNG images", not bad_images, sample(bad_images))


def _check_jobs_and_money(
    report: Report, store: Store, accounts: list[Account], subs: list[Submission], killed: set[str]
) -> None:
    submitted = len(subs)
    keyed = sum(1 for s in subs if s.idempotency_key is not None)
    jobs = store.rows("SELECT id, account_id, status, price, attempts, params FROM jobs")
    report.facts["jobs by status"] = dict(Counter(r.status for r in jobs))
    report.facts["jobs by attempts"] = dict(sorted(Counter(r.attempts for r in jobs).items()))
    # A job claimed again although no fault hit it: its live worker lost the lease (starved of
    # CPU past the lease, or not heartbeating while it stored the images).
    report.facts["jobs re-run without a fault"] = sum(
        1 for r in jobs if r.attempts > 1 and r.id not in killed
    )
    report.check(
        "one job per submission (retries with the same key made none)",
        len(jobs) == submitted,
        f"{len(jobs)} jobs for {submitted} submissions",
    )
    keys_ = store.rows("SELECT key, job_id FROM idempotency_keys")
    report.check(
        "every Idempotency-Key names one distinct job",
        len(keys_) == keyed and len({k.job_id for k in keys_}) == keyed,
        f"{len(keys_)} keys, {len({k.job_id for k in keys_})} jobs",
    )
    # The unkeyed clients' account: one job per request (its seed), so nobody paid twice.
    unkeyed = accounts[ACCOUNTS].account_id
    seeds = Counter(json.loads(j.params)["seed"] for j in jobs if j.account_id == unkeyed)
    report.facts["unkeyed sync requests: client tries"] = dict(
        Counter(t for s in subs if s.idempotency_key is None for t in s.tries)
    )
    report.check(
        "no account pays twice: without Idempotency-Keys, one job per sync request that "
        "followed the 503's words",
        sum(seeds.values()) == UNKEYED_SYNC_JOBS and set(seeds.values()) == {1},
        f"{sum(seeds.values())} jobs for {UNKEYED_SYNC_JOBS} requests; twice: "
        + sample(seed for seed, n in seeds.items() if n > 1),
    )
    report.check(
        "every job has exactly one terminal status",
        all(r.status in TERMINAL for r in jobs),
        sample(r for r in jobs if r.status not in TERMINAL),
    )
    entries = store.rows("SELECT account_id, job_id, kind, amount, balance_delta FROM ledger")
    by_job = group_by([e for e in entries if e.job_id], lambda e: e.job_id)
    wrong = []
    for job in jobs:
        kinds = Counter(e.kind for e in by_job.get(job.id, []))
        want = {"reserve": 1, "capture" if job.status == "COMPLETED" else "release": 1}
        amounts = {e.amount for e in by_job.get(job.id, [])}
        if dict(kinds) != want or amounts != {job.price}:
            wrong.append((job.id, job.status, dict(kinds), amounts, job.price))
    report.check(
        "COMPLETED: one reserve and one capture; others: one reserve and one release",
        not wrong,
        sample(wrong),
    )
    report.check(
        "no ledger entry for an unknown job",
        set(by_job) <= {j.id for j in jobs},
        sample(set(by_job) - {j.id for j in jobs}),
    )
    balances = {
        r.id: (r.balance, r.active_jobs)
        for r in store.rows("SELECT id, balance, active_jobs FROM accounts")
    }
    unequal = []
    for account in accounts:
        mine = [e for e in entries if e.account_id == account.account_id]
        by_kind = Counter()  # type: Counter[str]
        for e in mine:
            by_kind[e.kind] += e.amount
        from_kinds = by_kind["grant"] - by_kind["reserve"] + by_kind["release"]
        deltas = sum(e.balance_delta for e in mine)
        balance, active = balances[account.account_id]
        spent = sum(
            j.price for j in jobs if j.account_id == account.account_id and j.status == "COMPLETED"
        )
        expected = CREDITS - spent
        if not (balance == from_kinds == deltas == expected and active == 0):
            unequal.append((account.account_id, balance, from_kinds, deltas, expected, active))
    report.check(
        "each balance equals its ledger (grants - reserves + releases) and what its completed "
        "jobs cost; no job left counted as active",
        not unequal,
        sample(unequal),
    )


def _check_media(
    report: Report,
    store: Store,
    runtime: Any,
    cluster: Cluster,
    accounts: list[Account],
    subs: list[Submission],
) -> None:
    from auraserve.media.lifecycle import sweep_orphans

    keys_by_account = {a.account_id: a.key for a in accounts}
    completed = store.rows(
        "SELECT id, model_id, account_id, output FROM jobs WHERE status = 'COMPLETED'"
    )
    unfetchable: list[tuple[Any, ...]] = []
    fetched = 0
    with httpx.Client(timeout=30) as client:
        for n, job in enumerate(completed):
            request_id = f"{job.model_id}_{job.id}"
            api = cluster.api_url(n % len(cluster.apis))
            status = client.get(
                f"{api}/v2/requests/status/{request_id}",
                headers={"Ocp-Apim-Subscription-Key": keys_by_account[job.account_id]},
            )
            body = status.json() if status.status_code == 200 else {}
            urls = (body.get("output") or {}).get("media_url") or []
            expected = len(json.loads(job.output)["media"])
            if status.status_code != 200 or len(urls) != expected:
                unfetchable.append((request_id, status.status_code, len(urls), expected))
                continue
            for url in urls:
                got = client.get(url)
                if (
                    got.status_code != 200
                    or not got.content.startswith(b"\x89PNG")
                    or got.headers.get("content-type") != "image/png"
                ):
                    unfetchable.append((request_id, url[:80], got.status_code))
                else:
                    fetched += 1
    report.facts["images fetched through media_url"] = fetched
    report.check(
        "every COMPLETED job's images are fetchable through its media_url",
        not unfetchable and fetched > 0,
        f"{len(unfetchable)} failed: {sample(unfetchable, 3)}",
    )
    # OpenAI answers carry the same URLs: fetch a few.
    openai_urls = [
        item["url"]
        for s in subs
        if s.dialect == "openai" and s.status_code == 200
        for item in json.loads(s.content)["data"]
    ][:10]
    bad = [u[:80] for u in openai_urls if httpx.get(u, timeout=30).status_code != 200]
    report.check("OpenAI url answers are fetchable", not bad, sample(bad))

    # The orphan sweep with no grace, then the bucket must hold exactly what jobs own.
    owned_rows = store.rows("SELECT name, job_id FROM media_objects")
    owned = {r.name for r in owned_rows}
    outputs = {name for job in completed for name in json.loads(job.output)["media"]}
    swept = sweep_orphans(runtime.db, runtime.media, grace=0, now=time.time())
    stored = set(runtime.media.names_older_than(time.time() + 3600))
    report.facts["orphans swept"] = swept
    report.facts["objects in the bucket / owned rows / completed outputs"] = (
        len(stored),
        len(owned),
        len(outputs),
    )
    report.check(
        "media_objects rows are exactly the completed jobs' outputs",
        owned == outputs,
        f"rows without output {sample(owned - outputs, 3)}; "
        f"outputs without row {sample(outputs - owned, 3)}",
    )
    report.check(
        "no orphan objects after the sweep, and no owned object missing",
        stored == owned,
        f"orphans {sample(stored - owned, 3)}; missing {sample(owned - stored, 3)}",
    )


def _check_webhooks(report: Report, store: Store, receiver: WebhookReceiver) -> None:
    hooks = receiver.snapshot()
    deliveries = store.rows(
        "SELECT d.job_id, d.event_id, d.state, d.attempts, j.status, j.model_id "
        "FROM webhook_deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.terminal"
    )
    with_hook = store.rows("SELECT id FROM jobs WHERE webhook_url IS NOT NULL")
    report.facts["webhook attempts received / distinct events / retried events"] = (
        len(hooks),
        len({h.webhook_id for h in hooks}),
        sum(1 for n in Counter(h.webhook_id for h in hooks).values() if n > 1),
    )
    per_job = Counter(d.job_id for d in deliveries)
    report.check(
        "every job with a webhook has exactly one terminal event",
        set(per_job) == {r.id for r in with_hook} and set(per_job.values()) <= {1},
        f"{len(per_job)} jobs with events of {len(with_hook)}; "
        f"doubles {sample(j for j, n in per_job.items() if n > 1)}",
    )
    received = group_by(hooks, lambda h: h.webhook_id)
    missing = []
    for d in deliveries:
        got = [h for h in received.get(d.event_id, []) if h.verified and h.answered == 200]
        request_id = f"{d.model_id}_{d.job_id}"
        if (
            d.state != "delivered"
            or not got
            or any(h.status != d.status or h.request_id != request_id for h in got)
        ):
            missing.append((d.event_id, d.state, d.attempts, len(received.get(d.event_id, []))))
    report.check(
        "every terminal webhook was received, signed, with its job's final status",
        not missing and bool(deliveries),
        sample(missing, 3),
    )
    ids_per_event = {
        key: {h.webhook_id for h in group}
        for key, group in group_by(
            [h for h in hooks if h.status in TERMINAL], lambda h: (h.request_id, h.status)
        ).items()
    }
    report.check(
        "retries carry the same webhook-id (one id per request and status)",
        all(len(ids) == 1 for ids in ids_per_event.values()),
        sample(k for k, ids in ids_per_event.items() if len(ids) > 1),
    )
    report.check(
        "some deliveries were retried (the receiver refused first attempts)",
        any(len(g) > 1 for g in received.values()),
    )
    report.check(
        "every delivery verified with its account's secret",
        all(h.verified for h in hooks),
        sample(h.webhook_id for h in hooks if not h.verified),
    )
