"""What the metrics export about the shared store, in two cheap queries (ix_jobs_queue and
ix_workers_seen serve them): per model, jobs QUEUED and PROCESSING and the oldest QUEUED
job's submit time; and the workers heard from lately."""

from __future__ import annotations

import time

from sqlalchemy import func, select

from auraserve.observability.metrics import ModelQueue, StoreSample
from auraserve.store.db import Store
from auraserve.store.jobs import ACTIVE
from auraserve.store.reads import QUEUED
from auraserve.store.schema import job_checkpoints, jobs, workers

_BY_MODEL = (
    select(jobs.c.model_id, jobs.c.status, func.count(), func.min(jobs.c.created_at))
    .where(jobs.c.status.in_(ACTIVE))
    .group_by(jobs.c.model_id, jobs.c.status)
)


def sample(db: Store, *, stale_seconds: float) -> StoreSample:
    now = time.time()
    queued: dict[str, tuple[int, float | None]] = {}
    processing: dict[str, int] = {}
    with db.read() as conn:
        for model, status, count, oldest in conn.execute(_BY_MODEL):
            if status == QUEUED:
                queued[model] = (int(count), oldest)
            else:
                processing[model] = int(count)
        live = conn.execute(
            select(func.count())
            .select_from(workers)
            .where(workers.c.last_seen_at >= now - stale_seconds, workers.c.stopped_at.is_(None))
        ).scalar_one()
        checkpoint_bytes = conn.execute(
            select(func.coalesce(func.sum(job_checkpoints.c.size), 0))
        ).scalar_one()
    models = {
        model: ModelQueue(
            queued=queued.get(model, (0, None))[0],
            processing=processing.get(model, 0),
            oldest_queued_at=queued.get(model, (0, None))[1],
        )
        for model in {*queued, *processing}
    }
    return StoreSample(
        models=models,
        live_workers=int(live),
        checkpoint_bytes=int(checkpoint_bytes),
        taken_at=now,
    )
