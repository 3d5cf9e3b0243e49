"""A running job's step checkpoint (table `job_checkpoints`): which object holds it, and whose.

The bytes live in the media store (disk or S3) next to the images, under a fresh name per
checkpoint; the row is written after the object, in a transaction fenced on the job's lease, so
a worker that lost its job never leaves a checkpoint for it. One row per job, replaced as the
job moves on: the bytes held are bounded by the running jobs, not by their steps. A row keeps
its object from the orphan sweep (`store.media.owned`); the worker drops the row when the job
ends and the maintenance round drops those of jobs that ended without it (`forget_finished`),
after which the sweep removes their objects.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update

from auraserve.core.jobs import TERMINAL
from auraserve.store.db import Store
from auraserve.store.events import JOB, emit_each_in
from auraserve.store.schema import job_checkpoints, jobs

_C = job_checkpoints.c
_PROCESSING = "PROCESSING"
_ENDED = [status.value for status in TERMINAL]


@dataclass(frozen=True)
class Checkpoint:
    job_id: str
    name: str
    step: int
    total: int
    size: int
    worker_id: str


@dataclass(frozen=True)
class Saved:
    """The row now names the new object; `replaced` is the one it named before (the caller
    deletes that object; if it cannot, the sweep does)."""

    replaced: str | None


def save(
    db: Store,
    *,
    worker_id: str,
    job_id: str,
    name: str,
    step: int,
    total: int,
    size: int,
    now: float | None = None,
) -> Saved | None:
    """Record `name` as `job_id`'s newest checkpoint, if the job is still this worker's
    (PROCESSING under its lease); None when it is not (the caller deletes the object)."""
    now = time.time() if now is None else now
    with db.write() as conn:
        # FOR UPDATE on PostgreSQL: a lease rescue cannot requeue the job between this check
        # and the commit (SQLite's write transaction already excludes every other writer).
        ours = conn.execute(
            select(jobs.c.id)
            .where(jobs.c.id == job_id, jobs.c.lease_owner == worker_id)
            .where(jobs.c.status == _PROCESSING)
            .with_for_update()
        ).first()
        if ours is None:
            return None
        replaced = conn.execute(
            delete(job_checkpoints).where(_C.job_id == job_id).returning(_C.name)
        ).scalar()
        conn.execute(
            insert(job_checkpoints).values(
                job_id=job_id,
                name=name,
                step=step,
                total=total,
                size=size,
                worker_id=worker_id,
                created_at=now,
            )
        )
    return Saved(replaced=replaced)


def of_jobs(db: Store, job_ids: Collection[str]) -> dict[str, Checkpoint]:
    """The newest checkpoint of each of `job_ids` that has one."""
    if not job_ids:
        return {}
    with db.read() as conn:
        rows = conn.execute(select(job_checkpoints).where(_C.job_id.in_(list(job_ids)))).all()
    return {
        r.job_id: Checkpoint(r.job_id, r.name, r.step, r.total, r.size, r.worker_id) for r in rows
    }


def drop(db: Store, *, job_id: str) -> str | None:
    """Forget `job_id`'s checkpoint once the job has ended; the name of its object, for the
    caller to delete. While the job is live (requeued, or another worker's now) it is kept:
    whoever runs the job next resumes from it."""
    ended = select(jobs.c.id).where(jobs.c.id == job_id, jobs.c.status.in_(_ENDED))
    with db.write() as conn:
        return conn.execute(
            delete(job_checkpoints)
            .where(_C.job_id == job_id, _C.job_id.in_(ended))
            .returning(_C.name)
        ).scalar()


def mark_resumed(db: Store, *, worker_id: str, job_ids: Collection[str], step: int | None) -> None:
    """Show in the jobs' progress that this attempt resumed at `step` (None: from step 0)."""
    if not job_ids:
        return
    with db.write() as conn:
        values: dict[str, object] = {"progress_resumed_from": step, "updated_at": time.time()}
        if step is not None:
            values["progress_step"] = step
        changed = conn.scalars(
            update(jobs)
            .where(jobs.c.id.in_(list(job_ids)), jobs.c.lease_owner == worker_id)
            .where(jobs.c.status == _PROCESSING)
            .values(**values)
            .returning(jobs.c.id)
        ).all()
        emit_each_in(conn, JOB, changed)  # cached status rows of these jobs are stale now


def forget_finished(db: Store, *, limit: int = 500) -> list[str]:
    """Drop the rows of jobs that ended (or were deleted) with a checkpoint still recorded, e.g.
    failed for good by the lease rescue; returns their objects' names for the caller to delete
    (the orphan sweep removes any it could not)."""
    live = select(jobs.c.id).where(jobs.c.status.notin_(_ENDED))
    with db.write() as conn:
        stale = conn.scalars(select(_C.job_id).where(_C.job_id.notin_(live)).limit(limit)).all()
        if not stale:
            return []
        return list(
            conn.scalars(
                delete(job_checkpoints).where(_C.job_id.in_(stale)).returning(_C.name)
            ).all()
        )
