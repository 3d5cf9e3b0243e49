"""The job queue: submit, claim, progress, settle, recover.

Every state change is one short transaction. A worker's writes are fenced by
`lease_owner = :me AND status = 'PROCESSING'`, so a worker that was presumed dead (its lease
expired and the job was requeued or finished elsewhere) can neither complete nor charge.
Credits move in the same transaction as the status they belong to (see `ledger`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, insert, select, update

from auraserve.core.ids import uuid7
from auraserve.core.jobs import Job, JobStatus
from auraserve.core.request import GenerationRequest
from auraserve.store import ledger
from auraserve.store import media as media_rows
from auraserve.store.db import Store, store_of
from auraserve.store.events import JOB, WORK, emit_each_in, emit_in, unsent_events
from auraserve.store.reads import COUNT_AHEAD, QUEUE_ORDER, QUEUED, SELECT_JOB, SELECT_TENANT_JOB
from auraserve.store.schema import accounts, jobs

PROCESSING = JobStatus.PROCESSING.value
CANCELLED = JobStatus.CANCELLED.value
ACTIVE = (QUEUED, PROCESSING)
CANCELLED_BY_CLIENT = "cancelled by the client"
_MAX_LOG_LINES = 50

_INSERT_JOB = insert(jobs)
_NEW_JOB_NULLS: dict[str, Any] = dict.fromkeys(jobs.c.keys())
_RELEASE_SLOT = (
    update(accounts)
    .where(accounts.c.id == bindparam("acct"))
    .values(active_jobs=accounts.c.active_jobs - 1)
)


def transitioned_in(conn: Connection, rows: Sequence[Any], *, event: str = JOB) -> list[Job]:
    """Every status change goes through here, in its transaction (or, for `submit`'s
    one-statement batches, on its connection right before that statement): the account's
    active-job counter, the wake-up events and the store's transition hooks (webhook outbox)
    stay in step. Jobs that became claimable pass `event=WORK`: that one event wakes the
    workers and, like JOB, whoever watches the job (one NOTIFY on PostgreSQL instead of two)."""
    made = [Job.from_row(row) for row in rows]
    # Callers only pass rows that just changed status (their UPDATEs are fenced on the old
    # status), so a terminal row here is always a new arrival in a terminal state: settle its
    # money (capture if COMPLETED, else release) and free its queue slot, here and only here.
    for job in made:
        if job.is_terminal:
            if job.status == JobStatus.COMPLETED:
                ledger.capture_in(conn, job.account_id, job.id, job.price)
            else:
                ledger.release_in(conn, job.account_id, job.id, job.price)
            conn.execute(_RELEASE_SLOT, {"acct": job.account_id})
    emit_each_in(conn, event, [job.id for job in made])
    hooks = store_of(conn).transition_hooks
    for job in made:
        for hook in hooks:
            hook(conn, job)
    return made


@dataclass(frozen=True)
class NewJob:
    """What one submit asks for."""

    request: GenerationRequest
    price: int
    webhook_url: str | None = None
    webhook_mode: str | None = None
    # Chosen before the store is asked, so a submit whose COMMIT was cut off (in doubt) can
    # still name the job it may have made, and look it up once the database is back.
    id: str = field(default_factory=uuid7)


def submit_in(
    conn: Connection,
    *,
    account_id: str,
    new_jobs: Sequence[NewJob],
    max_queued: int,
    max_attempts: int,
    priority: int = 0,
) -> tuple[list[Job], int]:
    """Submits of one account in `conn`'s transaction: the jobs and their reservations
    inserted in one statement each, then one guarded UPDATE takes all their queue slots and
    credits, the last statement (see `ledger.reserve_many_in`): one lock of the account row
    per batch, which is what a busy account's submits queue on. All or nothing: raises
    QueueLimitReached or InsufficientBalance when they do not all fit; the transaction then
    rolls back (its events and hook rows go with it). Returns the jobs and the balance left."""
    rows = _job_values(account_id, new_jobs, max_attempts, priority)
    conn.execute(_INSERT_JOB, rows)
    made = transitioned_in(conn, [_new_row(values) for values in rows], event=WORK)
    store_of(conn).send_events(conn)  # now: the reservation must be the last statement
    reservations = [(job.id, job.price) for job in made]
    return made, ledger.reserve_many_in(conn, account_id, reservations, max_active=max_queued)


def submit(
    store: Store,
    *,
    account_id: str,
    new_jobs: Sequence[NewJob],
    max_queued: int,
    max_attempts: int,
    priority: int = 0,
) -> tuple[list[Job], int]:
    """`submit_in` in a transaction of its own; where the driver `submits_at_once` and no
    job has a webhook (no transition hook has anything to record for them), as one statement
    that commits on the server (the account row is locked for that statement only), its
    transitions recorded through `transitioned_in` on the same connection first."""
    driver = store.driver
    if driver.submits_at_once and all(new.webhook_url is None for new in new_jobs):
        rows = _job_values(account_id, new_jobs, max_attempts, priority)
        with store.at_once() as conn:
            made = transitioned_in(conn, [_new_row(values) for values in rows], event=WORK)
            events = unsent_events(conn)
            balance = driver.submit_at_once(conn, rows, max_active=max_queued, events=events)
            if balance is None:
                ledger.refuse(conn, account_id, len(rows), max_queued)
        return made, balance
    with store.write() as conn:
        return submit_in(
            conn,
            account_id=account_id,
            new_jobs=new_jobs,
            max_queued=max_queued,
            max_attempts=max_attempts,
            priority=priority,
        )


def _job_values(
    account_id: str, new_jobs: Sequence[NewJob], max_attempts: int, priority: int
) -> list[dict[str, Any]]:
    """New jobs' rows: QUEUED, nothing tried yet."""
    now = time.time()
    return [
        {
            "id": new.id,
            "account_id": account_id,
            "model_id": new.request.model,
            "status": QUEUED,
            "priority": priority,
            "params": new.request.model_dump_json(),
            "batch_key": new.request.batch_key,
            "num_images": new.request.num_images,
            "price": new.price,
            "attempts": 0,
            "max_attempts": max_attempts,
            "progress_step": 0,
            "progress_total": new.request.steps,
            "cancel_requested": False,
            "webhook_url": new.webhook_url,
            "webhook_mode": new.webhook_mode,
            "created_at": now,
            "updated_at": now,
        }
        for new in new_jobs
    ]


def _new_row(values: dict[str, Any]) -> Any:
    """A new job's row, built from what submit inserts (every other column NULL) rather than
    read back with RETURNING (every column through SQLAlchemy's result handling, on the
    hottest write)."""
    return SimpleNamespace(**{**_NEW_JOB_NULLS, **values})


def claim(
    db: Store,
    *,
    worker_id: str,
    models: Collection[str],
    max_images: int,
    lease_seconds: float,
) -> list[Job]:
    """Lease the oldest claimable job and as many jobs sharing its batch key as fit in
    `max_images` images. Lower `priority` runs first, then older jobs.

    PostgreSQL: `FOR UPDATE SKIP LOCKED` lets many workers claim at once without waiting on
    each other. SQLite: the write transaction is `BEGIN IMMEDIATE`, so claims are serialised.
    """
    now = time.time()
    with db.write() as conn:
        head = conn.execute(
            select(jobs.c.id, jobs.c.batch_key, jobs.c.num_images)
            .where(jobs.c.status == QUEUED, jobs.c.model_id.in_(list(models)))
            .order_by(*QUEUE_ORDER)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if head is None:
            return []
        ids = [head.id]
        room = max_images - head.num_images
        if room > 0:
            candidates = conn.execute(
                select(jobs.c.id, jobs.c.num_images)
                .where(
                    jobs.c.status == QUEUED,
                    jobs.c.batch_key == head.batch_key,
                    jobs.c.id != head.id,
                    jobs.c.num_images <= room,
                )
                .order_by(*QUEUE_ORDER)
                .limit(max_images)
                .with_for_update(skip_locked=True)
            ).all()
            for cand in candidates:
                if cand.num_images <= room:
                    ids.append(cand.id)
                    room -= cand.num_images
        rows = conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(ids), jobs.c.status == QUEUED)
            .values(
                status=PROCESSING,
                lease_owner=worker_id,
                lease_expires_at=now + lease_seconds,
                attempts=jobs.c.attempts + 1,
                started_at=func.coalesce(jobs.c.started_at, now),
                updated_at=now,
                progress_step=0,
            )
            .returning(*jobs.c)
        ).all()
        claimed = transitioned_in(conn, rows)
    order = {job_id: i for i, job_id in enumerate(ids)}
    return sorted(claimed, key=lambda j: order[j.id])


def _ended(now: float, status: str, **values: Any) -> dict[str, Any]:
    """The values of a job that reached terminal `status` now."""
    return {
        "status": status,
        **values,
        "lease_expires_at": None,
        "completed_at": now,
        "updated_at": now,
    }


def _requeued(now: float, **values: Any) -> dict[str, Any]:
    """The values of a job back in the queue, as if never claimed."""
    return {
        "status": QUEUED,
        "lease_owner": None,
        "lease_expires_at": None,
        "progress_step": 0,
        "updated_at": now,
        **values,
    }


def _fenced(job_ids: Collection[str], worker_id: str) -> Any:
    return and_(
        jobs.c.id.in_(list(job_ids)),
        jobs.c.lease_owner == worker_id,
        jobs.c.status == PROCESSING,
    )


def report_progress(
    db: Store,
    *,
    worker_id: str,
    job_ids: Collection[str],
    step: int | None,
    total: int | None,
    lease_seconds: float,
    log: str | None = None,
) -> tuple[set[str], set[str]]:
    """Record progress and extend the leases (this doubles as the heartbeat).

    Returns (jobs still ours, jobs whose cancellation was requested). A job missing from the
    first set was lost: its lease expired and someone else owns its fate now.
    """
    now = time.time()
    values: dict[str, Any] = {"lease_expires_at": now + lease_seconds, "updated_at": now}
    if step is not None:
        values["progress_step"] = step
    if total is not None:
        values["progress_total"] = total
    with db.write() as conn:
        if log is not None:
            _append_log_in(conn, job_ids, worker_id, now, log)
        rows = conn.execute(
            update(jobs)
            .where(_fenced(job_ids, worker_id))
            .values(**values)
            .returning(jobs.c.id, jobs.c.cancel_requested)
        ).all()
        # A heartbeat too: it moves `updated_at` (and may add a log line), which the status
        # shows, and API processes' row caches must hear of every change (JobRowCache).
        emit_each_in(conn, JOB, [r.id for r in rows])
    return {r.id for r in rows}, {r.id for r in rows if r.cancel_requested}


def _append_log_in(
    conn: Connection, job_ids: Collection[str], worker_id: str, now: float, message: str
) -> None:
    rows = conn.execute(select(jobs.c.id, jobs.c.logs).where(_fenced(job_ids, worker_id))).all()
    for r in rows:
        lines = json.loads(r.logs) if r.logs else []
        lines.append([now, message])
        conn.execute(
            update(jobs).where(jobs.c.id == r.id).values(logs=json.dumps(lines[-_MAX_LOG_LINES:]))
        )


def _finish(
    db: Store,
    worker_id: str,
    job_id: str,
    values: dict[str, Any],
    media: Collection[str] = (),
) -> Job | None:
    """Move a job we still own to a terminal status (settled by `transitioned_in`); the job
    owns `media` from the same transaction on (store.media), so no image is ever both
    referenced by a status and swept as an orphan."""
    now = time.time()
    with db.write() as conn:
        row = conn.execute(
            update(jobs)
            .where(_fenced([job_id], worker_id))
            .values(**_ended(now, **values))
            .returning(*jobs.c)
        ).first()
        if row is None:
            return None
        media_rows.record_in(conn, job_id, media, now)
        return transitioned_in(conn, [row])[0]


def complete(
    db: Store,
    *,
    worker_id: str,
    job_id: str,
    output: dict[str, Any],
    engine_seconds: float,
) -> Job | None:
    """COMPLETED and capture the reservation, if the job is still ours; else None."""
    return _finish(
        db,
        worker_id,
        job_id,
        {
            "status": JobStatus.COMPLETED.value,
            "output": json.dumps(output),
            "engine_seconds": engine_seconds,
            "progress_step": jobs.c.progress_total,
        },
        media=output.get("media") or (),
    )


def finish_unsuccessful(
    db: Store,
    *,
    worker_id: str,
    job_id: str,
    status: JobStatus,
    error: str | None,
) -> Job | None:
    """FAILED, ERROR or CANCELLED and release the reservation, if the job is still ours."""
    if status not in (JobStatus.FAILED, JobStatus.ERROR, JobStatus.CANCELLED):
        raise ValueError(f"not an unsuccessful status: {status}")
    return _finish(db, worker_id, job_id, {"status": status.value, "error": error})


def hand_back(db: Store, *, worker_id: str, job_ids: Collection[str]) -> list[str]:
    """A stopping worker gives jobs it still owns back to the queue, as if never claimed: the
    attempt its claim counted is returned (a graceful stop is not the job's fault) and the
    lease cleared. A job whose client asked to cancel it meanwhile ends CANCELLED instead (not
    charged) rather than running again. Fenced on the lease like every worker write. Returns
    the ids requeued."""
    if not job_ids:
        return []
    now = time.time()
    with db.write() as conn:
        _append_log_in(
            conn, job_ids, worker_id, now, f"handed back to the queue: {worker_id} stopped"
        )
        cancelled = conn.execute(
            update(jobs)
            .where(_fenced(job_ids, worker_id), jobs.c.cancel_requested.is_(True))
            .values(**_ended(now, CANCELLED, error=CANCELLED_BY_CLIENT))
            .returning(*jobs.c)
        ).all()
        transitioned_in(conn, cancelled)
        rows = conn.execute(
            update(jobs)
            .where(_fenced(job_ids, worker_id))
            .values(**_requeued(now, attempts=jobs.c.attempts - 1))
            .returning(*jobs.c)
        ).all()
        requeued = [job.id for job in transitioned_in(conn, rows, event=WORK)]
    return requeued


def recover_expired(db: Store, *, now: float | None = None) -> tuple[list[str], list[str]]:
    """Requeue jobs whose worker stopped heartbeating; past the attempt cap, ERROR and refund.

    Any worker (or the API) may call this; SKIP LOCKED keeps two callers from fighting.
    Returns (requeued ids, errored ids).
    """
    now = time.time() if now is None else now
    requeued: list[str] = []
    errored: list[str] = []
    with db.write() as conn:
        expired = conn.execute(
            select(jobs.c.id, jobs.c.attempts, jobs.c.max_attempts)
            .where(jobs.c.status == PROCESSING, jobs.c.lease_expires_at < now)
            .with_for_update(skip_locked=True)
        ).all()
        for job in expired:
            still_expired = and_(
                jobs.c.id == job.id,
                jobs.c.status == PROCESSING,
                jobs.c.lease_expires_at < now,
            )
            if job.attempts < job.max_attempts:
                row = conn.execute(
                    update(jobs).where(still_expired).values(**_requeued(now)).returning(*jobs.c)
                ).first()
                if row is not None:
                    requeued.append(job.id)
                    transitioned_in(conn, [row], event=WORK)
            else:
                row = conn.execute(
                    update(jobs)
                    .where(still_expired)
                    .values(
                        **_ended(
                            now,
                            JobStatus.ERROR.value,
                            error=f"the worker stopped responding {job.attempts} times; "
                            "giving up (not charged)",
                        )
                    )
                    .returning(*jobs.c)
                ).first()
                if row is not None:
                    errored.append(job.id)
                    transitioned_in(conn, [row])
    return requeued, errored


def get(db: Store, job_id: str, *, account_id: str | None = None) -> Job | None:
    """A job by id; with `account_id`, only if it belongs to that account (tenant scoping)."""
    with db.read() as conn:
        return get_in(conn, job_id, account_id=account_id)


def get_in(conn: Connection, job_id: str, *, account_id: str | None = None) -> Job | None:
    if account_id is None:
        row = conn.execute(SELECT_JOB, {"job_id": job_id}).first()
    else:
        row = conn.execute(SELECT_TENANT_JOB, {"job_id": job_id, "acct": account_id}).first()
    return None if row is None else job_in(conn, row)


def job_in(conn: Connection, row: Any) -> Job:
    """The job of a row read in `conn`, with its queue position (`QueuePositions`)."""

    def count(params: dict[str, object]) -> int:
        return int(conn.execute(COUNT_AHEAD, params).scalar_one())

    return Job.from_row(row, queue_position=store_of(conn).positions.of(row, count))


def count_active(db: Store, account_id: str) -> int:
    with db.read() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(jobs)
                .where(jobs.c.account_id == account_id, jobs.c.status.in_(ACTIVE))
            ).scalar_one()
        )


@dataclass(frozen=True)
class Cancellation:
    """What `cancel` did: `cancelled` (it was queued: now CANCELLED and refunded),
    `requested` (it is running: the worker stops it at its next step) or `finished` (it had
    already ended; `job` shows how)."""

    outcome: str
    job: Job


def cancel(db: Store, job_id: str, *, account_id: str) -> Cancellation | None:
    """Cancel a job of `account_id`; None if there is no such job (or it is another's)."""
    now = time.time()
    with db.write() as conn:
        # Fenced on QUEUED: a worker claiming it concurrently either wins (then it is running
        # and gets the flag below) or finds it CANCELLED; never both.
        row = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.account_id == account_id, jobs.c.status == QUEUED)
            .values(**_ended(now, CANCELLED, error=CANCELLED_BY_CLIENT))
            .returning(*jobs.c)
        ).first()
        if row is not None:
            return Cancellation("cancelled", transitioned_in(conn, [row])[0])
        row = conn.execute(
            update(jobs)
            .where(
                jobs.c.id == job_id,
                jobs.c.account_id == account_id,
                jobs.c.status == PROCESSING,
            )
            .values(cancel_requested=True, updated_at=now)
            .returning(*jobs.c)
        ).first()
        if row is not None:
            # Not a status change: wake watchers (SSE, sync waiters) but run no hooks.
            emit_in(conn, JOB, row.id)
            return Cancellation("requested", Job.from_row(row))
        job = get_in(conn, job_id, account_id=account_id)
    if job is None:
        return None
    return Cancellation("finished", job)
