"""The idempotent submit: key, reservation and job in one transaction; duplicates replay."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
from sqlalchemy import func, select, text

from auraserve.core.presets import default_presets
from auraserve.core.request import GenerationRequest, build_request
from auraserve.errors import (
    IdempotencyKeyReused,
    InsufficientBalance,
    QueueLimitReached,
    StoreUnavailable,
)
from auraserve.store import jobs, keys, ledger, submissions
from auraserve.store.db import Store
from auraserve.store.events import WORK
from auraserve.store.schema import idempotency_keys
from auraserve.store.schema import jobs as jobs_table
from auraserve.store.submissions import IdempotencyKey, Submitted

PRESET = default_presets()["auraflow-v0-3-512"]


def _req(prompt: str = "a cat") -> GenerationRequest:
    return build_request({"prompt": prompt}, model="auraflow-v0-3-512", preset=PRESET)


def _submit(db: Store, account_id: str, idem: IdempotencyKey | None, **kw: Any) -> Submitted:
    """A submit as the API makes it: a batch of one; its refusal raised."""
    req = _req()
    kw.setdefault("max_queued", 100)
    [answer] = submissions.submit(
        db,
        account_id=account_id,
        new_jobs=[jobs.NewJob(req, req.price(PRESET))],
        max_attempts=3,
        idem=idem,
        **kw,
    )
    if isinstance(answer, Exception):
        raise answer
    return answer


def _count(db: Store, table: Any) -> int:
    with db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_submit_with_a_key_replays_the_first_job_and_its_response(db: Store) -> None:
    acct = keys.create_account(db, "a", credits=1000)
    idem = IdempotencyKey(
        "k1", "digest-a", ttl=3600, build=lambda job: {"request_id": job.request_id}, status=202
    )
    assert submissions.replay(db, acct.account_id, idem) is None
    first = _submit(db, acct.account_id, idem)
    assert not first.replayed and first.response == {"request_id": first.job.request_id}
    again = submissions.replay(db, acct.account_id, idem)
    assert again is not None and again.replayed
    assert again.job.id == first.job.id and again.response == first.response
    assert again.balance == first.balance == ledger.balance(db, acct.account_id)
    # A second submit with the key (a retry that raced past the replay) makes nothing new.
    dup = _submit(db, acct.account_id, idem)
    assert dup.replayed and dup.job.id == first.job.id
    assert _count(db, jobs_table) == 1


def test_a_key_reused_with_another_request_is_refused(db: Store) -> None:
    acct = keys.create_account(db, "a", credits=1000)
    _submit(db, acct.account_id, IdempotencyKey("k1", "digest-a", ttl=3600))
    with pytest.raises(IdempotencyKeyReused) as err:
        submissions.replay(db, acct.account_id, IdempotencyKey("k1", "digest-b", ttl=3600))
    assert err.value.status == 422 and err.value.field == "Idempotency-Key"
    with pytest.raises(IdempotencyKeyReused):
        _submit(db, acct.account_id, IdempotencyKey("k1", "digest-b", ttl=3600))
    # Keys belong to their account: another account's same key is a new submit.
    other = keys.create_account(db, "b", credits=1000)
    assert not _submit(db, other.account_id, IdempotencyKey("k1", "digest-b", ttl=3600)).replayed


def test_a_refused_submit_leaves_its_key_free(db: Store) -> None:
    acct = keys.create_account(db, "poor", credits=1)
    idem = IdempotencyKey("k1", "digest-a", ttl=3600)
    with pytest.raises(InsufficientBalance):
        _submit(db, acct.account_id, idem)
    assert _count(db, idempotency_keys) == 0 and _count(db, jobs_table) == 0
    ledger.grant(db, acct.account_id, 1000)
    assert not _submit(db, acct.account_id, idem).replayed


def test_without_a_key_every_submit_is_new(db: Store) -> None:
    acct = keys.create_account(db, "a", credits=1000)
    a, b = _submit(db, acct.account_id, None), _submit(db, acct.account_id, None)
    assert a.job.id != b.job.id and not a.replayed and not b.replayed
    assert _count(db, idempotency_keys) == 0


def test_concurrent_duplicates_make_one_job_and_one_charge(db: Store) -> None:
    acct = keys.create_account(db, "a", credits=100_000)
    idem = IdempotencyKey("same-key", "digest-a", ttl=3600)
    n = 8
    barrier = threading.Barrier(n)
    outcomes: list[Submitted] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        try:
            result = _submit(db, acct.account_id, idem)
        except BaseException as exc:  # reported below, with the test's assertion
            with lock:
                failures.append(exc)
            return
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures
    assert len(outcomes) == n
    assert len({o.job.id for o in outcomes}) == 1
    assert sum(not o.replayed for o in outcomes) == 1
    assert _count(db, jobs_table) == 1
    kinds = [e["kind"] for e in ledger.entries(db, acct.account_id)]
    assert kinds.count("reserve") == 1
    assert ledger.balance(db, acct.account_id) == 100_000 - _req().price(PRESET)


def test_the_submitted_job_is_the_row_the_store_holds(db: Store) -> None:
    acct = keys.create_account(db, "a", credits=1000)
    submitted = _submit(db, acct.account_id, None)
    stored = jobs.get(db, submitted.job.id)
    assert stored is not None
    assert dataclasses.replace(stored, queue_position=None) == submitted.job


@pytest.mark.parametrize("refusal", ["balance", "queue limit"])
def test_a_submit_refused_at_its_reservation_leaves_no_trace(db: Store, refusal: str) -> None:
    """The job is inserted before the credits are reserved (the account row is locked for the
    shortest time); a refused reservation rolls all of it back, its events and hook calls
    included."""
    price = _req().price(PRESET)
    acct = keys.create_account(db, "a", credits=price if refusal == "queue limit" else price - 1)
    committed: list[str] = []
    db.on_committed_transition(lambda job: committed.append(job.id))
    published: list[tuple[str, str]] = []
    forward = db.bus.forward
    db.bus.forward = lambda kind, job_id: published.append((kind, job_id))
    try:
        max_queued = 100
        if refusal == "queue limit":
            _submit(db, acct.account_id, None)  # takes the only slot (and all the credits)
            ledger.grant(db, acct.account_id, price)
            max_queued, committed[:], published[:] = 1, [], []
        before = (ledger.entries(db, acct.account_id), ledger.balance(db, acct.account_id))
        jobs_before = _count(db, jobs_table)
        expected = QueueLimitReached if refusal == "queue limit" else InsufficientBalance
        with pytest.raises(expected):
            _submit(db, acct.account_id, IdempotencyKey("k", "d", ttl=60), max_queued=max_queued)
        assert (ledger.entries(db, acct.account_id), ledger.balance(db, acct.account_id)) == before
        assert _count(db, jobs_table) == jobs_before
        assert _count(db, idempotency_keys) == 0
        assert jobs.count_active(db, acct.account_id) == jobs_before
        assert committed == [] and published == []
        # Nothing of the refused transaction leaks into the next one on the connection.
        ledger.grant(db, acct.account_id, 10 * price)
        ok = _submit(db, acct.account_id, None, max_queued=100)
        assert committed == [ok.job.id]
        assert published == [(WORK, ok.job.id)]  # one event wakes workers and watchers
    finally:
        db.bus.forward = forward


# --- several submits of one account in one transaction ---------------------------------------


def _new_jobs(n: int, **kw: Any) -> list[jobs.NewJob]:
    req = _req()
    return [jobs.NewJob(req, req.price(PRESET), **kw) for _ in range(n)]


def _submit_many(db: Store, account_id: str, new: list[jobs.NewJob], max_queued: int = 100) -> Any:
    return submissions.submit(
        db, account_id=account_id, new_jobs=new, max_queued=max_queued, max_attempts=3
    )


def test_submits_that_all_fit_go_in_one_transaction_answered_as_if_one_by_one(
    db: Store,
) -> None:
    price = _req().price(PRESET)
    acct = keys.create_account(db, "a", credits=10 * price)
    published: list[tuple[str, str]] = []
    forward = db.bus.forward
    db.bus.forward = lambda kind, job_id: published.append((kind, job_id))
    try:
        answers = _submit_many(db, acct.account_id, _new_jobs(4))
    finally:
        db.bus.forward = forward
    assert all(isinstance(a, Submitted) and not a.replayed for a in answers)
    # Each balance is the one that submit alone, in this order, would have left.
    assert [a.balance for a in answers] == [9 * price, 8 * price, 7 * price, 6 * price]
    ids = [a.job.id for a in answers]
    assert published == [(WORK, i) for i in ids]
    for answer in answers:
        stored = jobs.get(db, answer.job.id)
        assert stored is not None
        assert dataclasses.replace(stored, queue_position=None) == answer.job
    entries = ledger.entries(db, acct.account_id)
    assert [(e["kind"], e["job_id"]) for e in entries[1:]] == [("reserve", i) for i in ids]
    assert jobs.count_active(db, acct.account_id) == 4
    assert ledger.balance(db, acct.account_id) == 6 * price
    if db.driver.name != "sqlite":
        # One transaction: every row was written by the same one (PostgreSQL's xmin).
        with db.read() as conn:
            writers = conn.execute(
                text("SELECT count(DISTINCT xmin::text) FROM jobs WHERE id = ANY(:ids)"),
                {"ids": ids},
            ).scalar_one()
        assert writers == 1


@pytest.mark.parametrize("refusal", ["balance", "queue limit"])
def test_submits_that_do_not_all_fit_get_each_the_answer_it_would_have_alone(
    db: Store, refusal: str
) -> None:
    price = _req().price(PRESET)
    credits = 3 * price if refusal == "balance" else 100 * price
    acct = keys.create_account(db, "a", credits=credits)
    max_queued = 3 if refusal == "queue limit" else 100
    answers = _submit_many(db, acct.account_id, _new_jobs(5), max_queued=max_queued)
    expected = InsufficientBalance if refusal == "balance" else QueueLimitReached
    assert [type(a) for a in answers] == [Submitted] * 3 + [expected] * 2
    assert [a.balance for a in answers[:3] if isinstance(a, Submitted)] == [
        credits - price,
        credits - 2 * price,
        credits - 3 * price,
    ]
    kinds = [e["kind"] for e in ledger.entries(db, acct.account_id)]
    assert kinds == ["grant"] + ["reserve"] * 3
    assert _count(db, jobs_table) == 3
    assert ledger.balance(db, acct.account_id) == credits - 3 * price


_DIE_ON = """
CREATE OR REPLACE FUNCTION auraserve_test_die() RETURNS trigger AS $$
BEGIN
  IF NEW.id = '{job_id}' THEN
    PERFORM pg_terminate_backend(pg_backend_pid());
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER auraserve_test_die BEFORE INSERT ON jobs
FOR EACH ROW EXECUTE FUNCTION auraserve_test_die();
"""


@pytest.mark.postgres
def test_a_store_lost_midway_one_by_one_keeps_the_answers_of_those_that_committed(
    db: Store,
) -> None:
    """Issue 18: a batch that does not fit goes one by one; when the store is lost at the
    second, the first committed and keeps its job (a 503 would tell its client "nothing was
    written" and invite a second, charged job), the second gets the store's error and the
    third, never sent, a plain StoreUnavailable."""
    if db.driver.name == "sqlite":
        pytest.skip("a connection killed mid-transaction: PostgreSQL")
    price = _req().price(PRESET)
    acct = keys.create_account(db, "a", credits=2 * price)  # 2 of the 3 fit
    new = _new_jobs(3)
    with db.engine.begin() as conn:  # the second job's INSERT kills its own connection
        conn.execute(text(_DIE_ON.format(job_id=new[1].id)))
    try:
        answers = _submit_many(db, acct.account_id, new)
    finally:
        with db.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER auraserve_test_die ON jobs"))
            conn.execute(text("DROP FUNCTION auraserve_test_die()"))
    first, second, third = answers
    assert isinstance(first, Submitted) and jobs.get(db, new[0].id) is not None
    assert isinstance(second, StoreUnavailable) and jobs.get(db, new[1].id) is None
    assert isinstance(third, StoreUnavailable) and not third.in_doubt
    assert jobs.get(db, new[2].id) is None
