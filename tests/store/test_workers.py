"""The worker registry on a real store: registration, presence, liveness, the live-models
lookup the status note uses, and pruning."""

from __future__ import annotations

import time

from sqlalchemy import update

from auraserve.store import workers
from auraserve.store.db import LIVE_MODELS_TTL, Store
from auraserve.store.schema import workers as workers_table


def _register(db: Store, worker_id: str, models: list[str]) -> None:
    workers.register(
        db, worker_id=worker_id, host="gpu-1", pid=42, models=models, device="tiny (cpu)"
    )


def _age(db: Store, worker_id: str, seconds: float) -> None:
    with db.write() as conn:
        conn.execute(
            update(workers_table)
            .where(workers_table.c.id == worker_id)
            .values(last_seen_at=time.time() - seconds)
        )


def test_a_worker_registers_heartbeats_and_says_goodbye(db: Store) -> None:
    _register(db, "w1", ["m-512", "m-1024"])
    (row,) = workers.list_workers(db)
    assert (row.id, row.host, row.pid, row.models, row.state) == (
        "w1",
        "gpu-1",
        42,
        ["m-512", "m-1024"],
        "starting",
    )
    assert row.liveness(30, time.time()) == "live"

    _age(db, "w1", 100)
    assert workers.list_workers(db)[0].liveness(30, time.time()) == "stale"
    assert workers.heartbeat(db, "w1", state="busy", jobs_done=7)
    (row,) = workers.list_workers(db)
    assert (row.state, row.jobs_done, row.liveness(30, time.time())) == ("busy", 7, "live")

    workers.mark_stopped(db, "w1", jobs_done=8)
    (row,) = workers.list_workers(db)
    assert row.state == "stopped" and row.stopped_at is not None and row.jobs_done == 8
    assert row.liveness(30, time.time()) == "stopped"
    # No row: the heartbeat says so, and the worker registers again.
    assert not workers.heartbeat(db, "nobody", state="ready", jobs_done=0)


def test_re_registering_under_the_same_id_takes_the_row_over(db: Store) -> None:
    _register(db, "fixed", ["a"])
    workers.mark_stopped(db, "fixed", jobs_done=3)
    _register(db, "fixed", ["b"])
    (row,) = workers.list_workers(db)
    assert row.models == ["b"] and row.state == "starting" and row.stopped_at is None
    assert row.jobs_done == 0


def test_live_models_count_only_live_workers_and_are_cached_briefly(db: Store) -> None:
    _register(db, "live", ["m-512"])
    _register(db, "stale", ["m-stale"])
    _age(db, "stale", 100)
    _register(db, "gone", ["m-gone"])
    workers.mark_stopped(db, "gone", jobs_done=0)
    assert workers.live_models(db, 30) == {"m-512"}

    # A worker on another machine starts: within the cache's second, this process may not
    # know yet; after it, it does.
    with db.write() as conn:
        conn.execute(
            update(workers_table)
            .where(workers_table.c.id == "stale")
            .values(last_seen_at=time.time())
        )
    time.sleep(LIVE_MODELS_TTL + 0.1)
    assert workers.live_models(db, 30) == {"m-512", "m-stale"}


def test_report_and_pruning(db: Store) -> None:
    _register(db, "new", ["a"])
    _register(db, "old", ["b"])
    _age(db, "old", 8 * 24 * 3600)
    now = time.time()
    report = workers.report(workers.list_workers(db), stale_seconds=30, now=now)
    assert [w["id"] for w in report["workers"]] == ["new", "old"]
    assert [w["liveness"] for w in report["workers"]] == ["live", "stale"]
    assert report["live_models"] == ["a"] and report["stale_after_seconds"] == 30
    assert workers.forget_old(db, older_than_seconds=7 * 24 * 3600) == 1
    assert [w.id for w in workers.list_workers(db)] == ["new"]
