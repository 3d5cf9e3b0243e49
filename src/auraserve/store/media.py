"""Which job owns which image object (table `media_objects`).

A row is written in the transaction that completes its job (`record_in`, called by
`store.jobs.complete`), so an object has a row exactly when a COMPLETED job references it. An
object without one belongs to nothing (its worker died before completing, or the completion was
refused) and the orphan sweep removes it (media.lifecycle). Retention deletes rows here first
and the objects after, so a crash in between leaves orphans for the sweep, never a status that
points at a deleted image while claiming it exists.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, delete, insert, select, update

from auraserve.store.db import Store
from auraserve.store.events import JOB, emit_each_in
from auraserve.store.schema import job_checkpoints, jobs, media_objects

_M = media_objects.c


def record_in(conn: Connection, job_id: str, names: Iterable[str], now: float) -> None:
    """Mark `names` as owned by `job_id`, in the caller's (completing) transaction."""
    rows = [{"name": name, "job_id": job_id, "created_at": now} for name in names]
    if rows:
        conn.execute(insert(media_objects), rows)


def owned(db: Store, names: Collection[str]) -> set[str]:
    """Those of `names` that some job owns: its images, or a running job's checkpoint."""
    if not names:
        return set()
    listed = list(names)
    with db.read() as conn:
        images = conn.scalars(select(_M.name).where(_M.name.in_(listed)))
        # A running job's step checkpoint (store.checkpoints) is owned by its row.
        checkpoints = conn.scalars(
            select(job_checkpoints.c.name).where(job_checkpoints.c.name.in_(listed))
        )
        return {*images, *checkpoints}


def is_owned(db: Store, name: str) -> bool:
    return bool(owned(db, [name]))


def names_of(db: Store, job_id: str) -> list[str]:
    with db.read() as conn:
        return list(conn.scalars(select(_M.name).where(_M.job_id == job_id).order_by(_M.name)))


@dataclass(frozen=True)
class Expired:
    job_ids: list[str]
    names: list[str]  # their objects, now owned by nothing: the caller deletes them


def expire_older_than(
    db: Store, *, cutoff: float, retention: float, now: float, limit: int = 500
) -> Expired:
    """Forget the images of up to `limit` jobs completed before `cutoff` and mark those jobs'
    outputs expired (`output.expired_at`, `output.retention_seconds`), in one transaction.

    Concurrent callers (several replicas) never both expire one job: the DELETE decides, and
    only the jobs whose rows this call deleted are marked and returned. Each marked job emits a
    JOB event (one NOTIFY statement for all), so no process serves its old output from a cache
    (`store.job_reads`)."""
    with db.write() as conn:
        job_ids = list(
            conn.scalars(select(_M.job_id).where(_M.created_at < cutoff).distinct().limit(limit))
        )
        if not job_ids:
            return Expired([], [])
        deleted = conn.execute(
            delete(media_objects).where(_M.job_id.in_(job_ids)).returning(_M.name, _M.job_id)
        ).all()
        won = sorted({r.job_id for r in deleted})
        outputs = conn.execute(
            select(jobs.c.id, jobs.c.output).where(jobs.c.id.in_(won), jobs.c.output.isnot(None))
        ).all()
        for row in outputs:
            output = json.loads(row.output)
            output["expired_at"] = now
            output["retention_seconds"] = retention
            conn.execute(
                update(jobs)
                .where(jobs.c.id == row.id)
                .values(output=json.dumps(output), updated_at=now)
            )
        emit_each_in(conn, JOB, [row.id for row in outputs])
    return Expired(won, [r.name for r in deleted])
