"""The status read's statements and queue positions, in one place for every read path
(`jobs.get_in` and both drivers' `JobReader`s): the tenant-scoped select of one job, and the
count of the jobs queued ahead of it, each remembered for a moment (`QueuePositions`).

Positions are advisory and only move when the queue head moves, so each process keeps them
for a moment: a client (or many) polling a deep queue costs one count per job per
POSITION_TTL instead of one per poll. Counting the jobs ahead costs time proportional to the
answer; past QUEUE_POSITION_CAP the exact number no longer helps a client decide anything, so
polls stay cheap on deep queues.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import bindparam, func, select, tuple_

from auraserve.core.jobs import JobStatus
from auraserve.store.cache import Flights, TtlCache
from auraserve.store.schema import jobs

QUEUED = JobStatus.QUEUED.value
POSITION_TTL = 0.5
# After that a position may still answer async polls while one count renews it
# (`QueuePositions.of_async`), so no poll waits for a count each time it expires.
POSITION_GRACE = 30.0
POSITION_CACHE_MAX = 50_000
QUEUE_POSITION_CAP = 10_000

QUEUE_ORDER = (jobs.c.priority, jobs.c.created_at, jobs.c.id)

SELECT_JOB = select(jobs).where(jobs.c.id == bindparam("job_id"))
SELECT_TENANT_JOB = select(jobs).where(
    jobs.c.id == bindparam("job_id"), jobs.c.account_id == bindparam("acct")
)

# How many queued jobs come before a given one: built once, run through SQLAlchemy here and
# compiled for the raw drivers of the status reads.
COUNT_AHEAD = select(func.count()).select_from(
    select(jobs.c.id)
    .where(
        jobs.c.status == QUEUED,
        tuple_(*QUEUE_ORDER)
        < tuple_(
            bindparam("priority", type_=jobs.c.priority.type),
            bindparam("created_at", type_=jobs.c.created_at.type),
            bindparam("job_id", type_=jobs.c.id.type),
        ),
    )
    .limit(QUEUE_POSITION_CAP)
    .subquery()
)


def count_ahead_params(row: Any) -> dict[str, object]:
    """`COUNT_AHEAD`'s parameters for a job row."""
    return {"priority": row.priority, "created_at": row.created_at, "job_id": row.id}


class QueuePositions(TtlCache[str, int]):
    """Positions by job id, each counted by whichever read path asks first."""

    def __init__(self, *, ttl: float = POSITION_TTL) -> None:
        super().__init__(ttl=ttl, maxsize=POSITION_CACHE_MAX, grace=POSITION_GRACE)
        self._counting: Flights[str, int] = Flights()

    def of(self, row: Any, count: Callable[[dict[str, object]], int]) -> int | None:
        """The position of a job row (None unless QUEUED): remembered, else `count(params)`
        of `COUNT_AHEAD`."""
        if row.status != QUEUED:
            return None
        position = self.get(row.id)
        if position is None:
            position = count(count_ahead_params(row))
            self.put(row.id, position)
        return position

    async def of_async(
        self, row: Any, count: Callable[[dict[str, object]], Awaitable[int]]
    ) -> int | None:
        """`of` for async reads, one count at a time per job: polls that arrive while it runs
        answer with the job's previous count (a position is approximate, up to POSITION_TTL
        old, anyway), or wait for this one when there is none. Without this, every poll in
        flight when the position expired ran its own count, a scan of the queue ahead, and
        those polls made the p99 (bench/scaleout.py: 26-46 ms, /healthz's 14)."""
        if row.status != QUEUED:
            return None
        position = self.get(row.id)
        if position is not None:
            return position
        counting = self._counting.start(row.id, lambda: self._count(row, count))
        previous = self.get_stale(row.id)
        if previous is not None:
            return previous
        return await asyncio.shield(counting)

    async def _count(self, row: Any, count: Callable[[dict[str, object]], Awaitable[int]]) -> int:
        position = await count(count_ahead_params(row))
        self.put(row.id, position)
        return position
