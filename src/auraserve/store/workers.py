"""The worker registry: who claims jobs, for which models, and when each was last heard from.

A worker registers at start, refreshes its row with its presence heartbeat (every
`heartbeat_seconds`, busy or idle) and marks itself stopped at exit. A worker that crashed
never says so: its row just stops being refreshed, and it counts as live only while
`last_seen_at` is within `worker_stale_seconds`. Any process can then tell which models some
live worker serves (`live_models`): the API says so on a queued job nobody will run, and
`auraserve workers` / `GET /v2/workers` list the rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update

from auraserve.core.status import iso
from auraserve.store.db import Store
from auraserve.store.schema import workers

STOPPED = "stopped"


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    models: list[str]
    device: str
    state: str
    jobs_done: int
    started_at: float
    last_seen_at: float
    stopped_at: float | None

    def is_live(self, stale_seconds: float, now: float) -> bool:
        return self.state != STOPPED and now - self.last_seen_at <= stale_seconds

    def liveness(self, stale_seconds: float, now: float) -> str:
        """live | stale (not heard from: crashed, frozen or cut off) | stopped (said goodbye)."""
        if self.state == STOPPED:
            return STOPPED
        return "live" if self.is_live(stale_seconds, now) else "stale"


def register(
    db: Store,
    *,
    worker_id: str,
    host: str,
    pid: int,
    models: Sequence[str],
    device: str,
    state: str = "starting",
) -> None:
    """Insert or refresh this worker's row. A worker restarted under the same id (a fixed
    AURASERVE_WORKER_ID) takes its row over: counters restart with the process."""
    now = time.time()
    values = {
        "host": host[:255],
        "pid": pid,
        "models": json.dumps(list(models)),
        "device": device[:255],
        "state": state,
        "jobs_done": 0,
        "started_at": now,
        "last_seen_at": now,
        "stopped_at": None,
    }
    with db.write() as conn:
        updated = conn.execute(update(workers).where(workers.c.id == worker_id).values(**values))
        if updated.rowcount == 0:
            conn.execute(insert(workers).values(id=worker_id, **values))
    _forget_live_models(db)


def heartbeat(db: Store, worker_id: str, *, state: str, jobs_done: int) -> bool:
    """Refresh the row: the worker is alive, in `state`, with `jobs_done` jobs completed.
    False when there is no row to refresh (the worker must register)."""
    with db.write() as conn:
        result = conn.execute(
            update(workers)
            .where(workers.c.id == worker_id)
            .values(state=state, jobs_done=jobs_done, last_seen_at=time.time(), stopped_at=None)
        )
    return result.rowcount == 1


def mark_stopped(db: Store, worker_id: str, *, jobs_done: int) -> None:
    now = time.time()
    with db.write() as conn:
        conn.execute(
            update(workers)
            .where(workers.c.id == worker_id)
            .values(state=STOPPED, jobs_done=jobs_done, last_seen_at=now, stopped_at=now)
        )
    _forget_live_models(db)


def list_workers(db: Store) -> list[WorkerInfo]:
    """Every registered worker, the most recently heard from first."""
    with db.read() as conn:
        rows = conn.execute(
            select(workers).order_by(workers.c.last_seen_at.desc(), workers.c.id)
        ).all()
    return [WorkerInfo(**{**r._mapping, "models": list(json.loads(r.models))}) for r in rows]


def cached_live_models(
    db: Store, stale_seconds: float, *, stale_ok: bool = False
) -> frozenset[str] | None:
    """`live_models` if this process remembers them, else None: never touches the store, so
    async code may ask on the event loop. `stale_ok`: also what it remembered up to
    `store.db.LIVE_MODELS_GRACE` longer, to answer with while `live_models` renews it."""
    cache = db.live_models
    return cache.get_stale(stale_seconds) if stale_ok else cache.get(stale_seconds)


def live_models(db: Store, stale_seconds: float) -> frozenset[str]:
    """The models at least one live worker serves; remembered `store.db.LIVE_MODELS_TTL` s in
    the store's `live_models` cache."""
    cache = db.live_models
    served = cache.get(stale_seconds)
    if served is None:
        since = time.time() - stale_seconds
        with db.read() as conn:
            rows = conn.execute(
                select(workers.c.models).where(
                    workers.c.state != STOPPED, workers.c.last_seen_at >= since
                )
            ).all()
        served = frozenset(model for r in rows for model in json.loads(r.models))
        cache.put(stale_seconds, served)
    return served


def forget_old(db: Store, *, older_than_seconds: float) -> int:
    """Delete rows not heard from for this long (stopped or crashed workers), so the registry
    does not grow with every restart. Returns how many went."""
    with db.write() as conn:
        result = conn.execute(
            delete(workers).where(workers.c.last_seen_at < time.time() - older_than_seconds)
        )
    return int(result.rowcount or 0)


def report(rows: Sequence[WorkerInfo], *, stale_seconds: float, now: float) -> dict[str, Any]:
    """The registry as `GET /v2/workers` and `auraserve workers --json` show it."""
    return {
        "workers": [
            {
                **asdict(w),
                "liveness": w.liveness(stale_seconds, now),
                "started_at": iso(w.started_at),
                "last_seen_at": iso(w.last_seen_at),
                "stopped_at": iso(w.stopped_at),
                "seconds_since_seen": round(max(0.0, now - w.last_seen_at), 3),
            }
            for w in rows
        ],
        "live_models": sorted({m for w in rows if w.is_live(stale_seconds, now) for m in w.models}),
        "stale_after_seconds": stale_seconds,
    }


def _forget_live_models(db: Store) -> None:
    # This process's own worker came or went: its next poll should know at once.
    db.live_models.clear()
