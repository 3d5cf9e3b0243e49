"""An account's history: its jobs newest first by keyset cursor, and its credits' story."""

from __future__ import annotations

import pytest

from auraserve.core.jobs import JobStatus
from auraserve.core.presets import default_presets
from auraserve.core.request import GenerationRequest, build_request
from auraserve.errors import BadCursor
from auraserve.store import history, jobs, keys, ledger
from auraserve.store.db import Store
from tests.store_jobs import submit_one

MODEL = "auraflow-v0-3-512"
PRESET = default_presets()[MODEL]


def _req(prompt: str) -> GenerationRequest:
    return build_request({"prompt": prompt, "steps": 4}, model=MODEL, preset=PRESET)


def _submit(db: Store, account_id: str, prompt: str) -> str:
    req = _req(prompt)
    sub = submit_one(
        db,
        account_id=account_id,
        request=req,
        price=req.price(PRESET),
        max_queued=100,
        max_attempts=3,
    )
    return sub.job.id


def test_lists_only_the_accounts_jobs_newest_first_across_pages(db: Store) -> None:
    mine = keys.create_account(db, "mine", credits=10_000).account_id
    theirs = keys.create_account(db, "theirs", credits=10_000).account_id
    submitted = []
    for i in range(5):
        submitted.append(_submit(db, mine, f"mine {i}"))
        _submit(db, theirs, f"theirs {i}")

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = history.list_jobs(db, mine, limit=2, cursor=cursor)
        pages += 1
        assert all(j.account_id == mine for j in page.jobs)
        seen += [j.id for j in page.jobs]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(reversed(submitted))
    assert pages == 3
    # A page that exactly fills the remainder says there is no next page.
    assert history.list_jobs(db, mine, limit=5).next_cursor is None
    assert [j.request.prompt for j in history.list_jobs(db, theirs, limit=100).jobs] == [
        f"theirs {i}" for i in reversed(range(5))
    ]


def test_filters_by_status_and_reports_queue_positions(db: Store) -> None:
    acct = keys.create_account(db, "f", credits=10_000).account_id
    first = _submit(db, acct, "one")
    second = _submit(db, acct, "two")
    cancelled = jobs.cancel(db, first, account_id=acct)
    assert cancelled is not None
    page = history.list_jobs(db, acct, status=JobStatus.CANCELLED)
    assert [j.id for j in page.jobs] == [first]
    queued = history.list_jobs(db, acct, status=JobStatus.QUEUED).jobs
    assert [j.id for j in queued] == [second]
    assert queued[0].queue_position == 0
    assert history.list_jobs(db, acct, status=JobStatus.COMPLETED).jobs == []


def test_a_cursor_from_elsewhere_is_refused(db: Store) -> None:
    acct = keys.create_account(db, "c", credits=0).account_id
    for bad in ("nope", "", "W10", history.encode_cursor(1.0, "short")):
        with pytest.raises(BadCursor):
            history.list_jobs(db, acct, cursor=bad)
    with pytest.raises(ValueError, match="limit must be"):
        history.list_jobs(db, acct, limit=0)
    with pytest.raises(ValueError, match="limit must be"):
        history.list_jobs(db, acct, limit=history.MAX_PAGE + 1)


def test_account_summary_shows_balance_reservations_and_entries(db: Store) -> None:
    created = keys.create_account(db, "sum", credits=1000)
    other = keys.create_account(db, "other", credits=1000)
    acct = created.account_id
    price = _req("x").price(PRESET)
    kept = _submit(db, acct, "kept")
    dropped = _submit(db, acct, "dropped")
    _submit(db, other.account_id, "not mine")
    assert jobs.cancel(db, dropped, account_id=acct) is not None

    summary = history.account_summary(db, acct)
    assert summary is not None
    assert summary.name == "sum"
    assert summary.balance == ledger.balance(db, acct) == 1000 - price
    assert summary.reserved == price
    kinds = [(e.kind, e.request_id) for e in summary.entries]
    assert kinds == [
        ("release", f"{MODEL}_{dropped}"),
        ("reserve", f"{MODEL}_{dropped}"),
        ("reserve", f"{MODEL}_{kept}"),
        ("grant", None),
    ]
    assert [e.balance_delta for e in summary.entries] == [price, -price, -price, 1000]
    newest = history.account_summary(db, acct, entries=1)
    assert newest is not None and [e.kind for e in newest.entries] == ["release"]
    assert history.account_summary(db, "no-such-account") is None


def test_a_page_is_read_through_the_account_time_index(db: Store) -> None:
    """The listing is ordered by the index itself (no sort of all the account's jobs), with and
    without a cursor. PostgreSQL is told to avoid sequential scans and sorts (on a tiny table
    its planner would pick either), so the plan shows whether the index can serve the page."""
    account_id = keys.create_account(db, "history-index", credits=1_000).account_id
    _submit(db, account_id, "one")
    cursor = history.encode_cursor(1e12, "0" * 36)
    for page_cursor in (None, cursor):
        query = history.page_query(account_id, limit=20, cursor=page_cursor, status=None)
        sql = str(query.compile(db.engine, compile_kwargs={"literal_binds": True}))
        with db.engine.connect() as conn:
            if db.driver.name == "sqlite":
                rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
                plan = " ".join(str(row[-1]) for row in rows)
                assert "ix_jobs_account_created" in plan, plan
                assert "TEMP B-TREE" not in plan, plan
            else:
                conn.exec_driver_sql("SET enable_seqscan = off")
                conn.exec_driver_sql("SET enable_sort = off")
                plan = " ".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))
                conn.rollback()
                assert "ix_jobs_account_created" in plan, plan
                assert "Sort" not in plan, plan
