"""One account's concurrent submits against a live server: batched into shared transactions
while the store is busy (or, on SQLite, as they arrive in one turn of the event loop), and each
answered exactly as if it had gone alone."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import event, text

from auraserve.config import Settings
from auraserve.core.presets import default_presets
from auraserve.core.request import build_request
from auraserve.store import jobs, ledger
from tests.conftest import LiveServer, make_tenant

SUBMIT = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
PRICE = build_request(
    {"prompt": "p"}, model="auraflow-v0-3-512", preset=default_presets()["auraflow-v0-3-512"]
).price(default_presets()["auraflow-v0-3-512"])
CONCURRENT = 48
AFFORDABLE = 30


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"rate_limit_per_minute": 0, "max_queued_per_account": 10 * CONCURRENT}
    )


async def _submit_all(url: str, headers: dict[str, str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=CONCURRENT)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(SUBMIT, headers=headers, json={"prompt": f"p{i}"})
                for i in range(CONCURRENT)
            )
        )


def test_concurrent_submits_of_one_account_never_overdraw(api_only_server: LiveServer) -> None:
    runtime = api_only_server.runtime
    tenant = make_tenant(runtime, credits=AFFORDABLE * PRICE)
    answers = asyncio.run(_submit_all(api_only_server.url, tenant.headers))

    statuses = sorted(r.status_code for r in answers)
    assert statuses == [202] * AFFORDABLE + [402] * (CONCURRENT - AFFORDABLE)
    # Each accepted submit saw the balance it would have seen alone: all different, none < 0.
    remaining = [int(r.headers["x-remaining-credits"]) for r in answers if r.status_code == 202]
    assert sorted(remaining) == [PRICE * i for i in range(AFFORDABLE)]
    db = runtime.db
    assert ledger.balance(db, tenant.account_id) == 0
    entries = ledger.entries(db, tenant.account_id)
    assert sum(int(str(e["balance_delta"])) for e in entries) == 0
    assert [e["kind"] for e in entries].count("reserve") == AFFORDABLE
    assert jobs.count_active(db, tenant.account_id) == AFFORDABLE


def test_concurrent_submits_of_one_account_share_transactions(
    api_only_server: LiveServer,
) -> None:
    runtime = api_only_server.runtime
    credits = 10 * CONCURRENT * PRICE
    tenant = make_tenant(runtime, credits=credits)
    commits: list[None] = []

    def count(conn: object) -> None:
        commits.append(None)

    event.listen(runtime.db.engine, "commit", count)
    try:
        answers = asyncio.run(_submit_all(api_only_server.url, tenant.headers))
    finally:
        event.remove(runtime.db.engine, "commit", count)
    assert [r.status_code for r in answers] == [202] * CONCURRENT
    remaining = sorted(int(r.headers["x-remaining-credits"]) for r in answers)
    assert remaining == [credits - PRICE * i for i in range(CONCURRENT, 0, -1)]
    # Batched: fewer transactions than submits (whatever else committed meanwhile included).
    assert len(commits) < CONCURRENT, len(commits)
    if runtime.db.driver.name != "sqlite":
        # And the jobs say so themselves: PostgreSQL's xmin is the transaction that wrote them.
        with runtime.db.read() as conn:
            writers = conn.execute(
                text("SELECT count(DISTINCT xmin::text) FROM jobs WHERE account_id = :a"),
                {"a": tenant.account_id},
            ).scalar_one()
        assert writers < CONCURRENT, writers
