"""Live previews: who watches a job, and the newest preview its worker made.

An open status stream marks its job watched for a few seconds at a time
(`jobs.preview_wanted_until`, renewed while the stream lives), and a job whose progress webhooks
ask for previews is watched while it runs; the job's worker asks (`wanted`,
at most once a second) and makes previews only for watched jobs, so nobody pays for pictures
nobody sees. A preview is a few small JPEGs (one per image, ~10 KB each), kept as the job's one
`job_previews` row and replaced every few steps; writing one emits the job's event, which wakes
its streams (in every API process) to send it. Rows of ended jobs are dropped by `drop`.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, delete, insert, or_, select, update

from auraserve.store.db import Store
from auraserve.store.events import JOB, emit_in
from auraserve.store.schema import job_previews, jobs

_P = job_previews.c

# The webhook mode of a job whose progress callbacks carry previews (`X-Webhook-Mode: sync`
# with `X-Webhook-Previews: true`): such a job is watched for as long as it runs.
PREVIEWS_WEBHOOK_MODE = "sync_previews"


@dataclass(frozen=True)
class Preview:
    step: int
    total: int
    images: list[str]  # base64 JPEGs, one per image of the job


def want(db: Store, job_id: str, *, seconds: float, now: float | None = None) -> None:
    """Someone watches `job_id` for the next `seconds` (a stream renews this while open)."""
    now = time.time() if now is None else now
    with db.write() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_(("QUEUED", "PROCESSING")))
            .values(preview_wanted_until=now + seconds)
        )


def wanted(db: Store, job_ids: Collection[str], *, now: float | None = None) -> set[str]:
    """Those of `job_ids` someone watches now."""
    if not job_ids:
        return set()
    now = time.time() if now is None else now
    with db.read() as conn:
        return set(
            conn.scalars(
                select(jobs.c.id).where(
                    jobs.c.id.in_(list(job_ids)),
                    or_(
                        jobs.c.preview_wanted_until > now,
                        jobs.c.webhook_mode == PREVIEWS_WEBHOOK_MODE,
                    ),
                )
            )
        )


def save(
    db: Store,
    *,
    worker_id: str,
    job_id: str,
    step: int,
    total: int,
    images: Sequence[bytes],
    now: float | None = None,
) -> bool:
    """Keep `images` as the job's newest preview if the job is still this worker's."""
    now = time.time() if now is None else now
    encoded = json.dumps([base64.b64encode(image).decode("ascii") for image in images])
    with db.write() as conn:
        ours = conn.execute(
            select(jobs.c.id).where(
                jobs.c.id == job_id, jobs.c.lease_owner == worker_id, jobs.c.status == "PROCESSING"
            )
        ).first()
        if ours is None:
            return False
        conn.execute(delete(job_previews).where(_P.job_id == job_id))
        conn.execute(
            insert(job_previews).values(
                job_id=job_id, step=step, total=total, images=encoded, created_at=now
            )
        )
        emit_in(conn, JOB, job_id)  # wakes the job's streams, here and in other processes
    return True


def newest(db: Store, job_id: str, *, after_step: int = 0) -> Preview | None:
    """The job's newest preview, if it is past `after_step`."""
    with db.read() as conn:
        return newest_in(conn, job_id, after_step=after_step)


def newest_in(conn: Connection, job_id: str, *, after_step: int = 0) -> Preview | None:
    """`newest`, in the caller's transaction (a progress webhook's body is built in one)."""
    row = conn.execute(
        select(_P.step, _P.total, _P.images).where(_P.job_id == job_id, _P.step > after_step)
    ).first()
    if row is None:
        return None
    return Preview(step=row.step, total=row.total, images=json.loads(row.images))


def drop(db: Store, job_id: str) -> None:
    """The job ended: its preview is of no more use."""
    with db.write() as conn:
        conn.execute(delete(job_previews).where(_P.job_id == job_id))


def forget_finished(db: Store) -> int:
    """Drop the previews of jobs that ended without their worker dropping them."""
    ended = select(jobs.c.id).where(jobs.c.status.notin_(("QUEUED", "PROCESSING")))
    with db.write() as conn:
        return conn.execute(delete(job_previews).where(_P.job_id.in_(ended))).rowcount or 0
