"""Submitting a job, idempotently: the one write transaction behind every dialect's submit.

With an idempotency key, the key row, the credit reservation and the job commit together in
one transaction, so either all exist or none does. Two concurrent submits with the same key
cannot both insert it (the key is the table's primary key): the second waits for the first
(PostgreSQL's row lock, SQLite's single writer), fails with IntegrityError and answers with the
first one's job instead of making another. A key sent again with a different request is
refused (IdempotencyKeyReused).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError

from auraserve.core.jobs import Job
from auraserve.core.request import GenerationRequest
from auraserve.errors import (
    IdempotencyKeyReused,
    InsufficientBalance,
    QueueLimitReached,
    RequestNotFound,
    StoreUnavailable,
)
from auraserve.store import idempotency, jobs, ledger
from auraserve.store.db import Database

log = logging.getLogger(__name__)

# Builds the body the first response returned, stored with the key so a replay returns it
# verbatim (dialects whose response is the finished job pass none).
ResponseBuilder = Callable[[Job], dict[str, Any]]


@dataclass(frozen=True)
class IdempotencyKey:
    """A client's key and the fingerprint of the request it was sent with."""

    key: str
    fingerprint: str
    ttl: float


@dataclass(frozen=True)
class Submitted:
    job: Job
    balance: int  # the account's spendable balance right after the submit (or now, on replay)
    replayed: bool
    # The first response's body, when the submit stored one.
    response: dict[str, Any] | None = None


def replay(db: Database, account_id: str, idem: IdempotencyKey) -> Submitted | None:
    """What the key's earlier submit made, or None when the key is new (or expired).
    Raises IdempotencyKeyReused when the key was sent with another request."""
    with db.read() as conn:
        stored = idempotency.lookup_in(conn, account_id, idem.key, ttl=idem.ttl)
        if stored is None:
            return None
        if stored.request_hash != idem.fingerprint:
            raise IdempotencyKeyReused(idem.key)
        if stored.job_id is None:  # cannot happen: the key and its job commit together
            return None
        job = jobs.get_in(conn, stored.job_id, account_id=account_id)
        if job is None:
            raise RequestNotFound("The request this Idempotency-Key made no longer exists")
        balance = ledger.balance_in(conn, account_id)
    return Submitted(job, balance, True, stored.response)


def submit(
    db: Database,
    *,
    account_id: str,
    request: GenerationRequest,
    price: int,
    max_queued: int,
    max_attempts: int,
    webhook_url: str | None = None,
    webhook_mode: str | None = None,
    idem: IdempotencyKey | None = None,
    build_response: ResponseBuilder | None = None,
    response_status: int | None = None,
) -> Submitted:
    """Take the key (if any), a queue slot and the credits, and insert the job, in one
    transaction. Raises QueueLimitReached or InsufficientBalance with nothing written (the key
    stays free for a retry). A concurrent submit that took the same key first wins: its job
    is returned as a replay. `build_response` and `response_status` describe the first
    response, stored with the key so that a replay can return it."""

    def transaction() -> jobs.Submission:
        with db.write() as conn:
            if idem is not None:
                idempotency.claim_in(conn, account_id, idem.key, idem.fingerprint, ttl=idem.ttl)
            submission = jobs.submit_in(
                conn,
                account_id=account_id,
                request=request,
                price=price,
                max_queued=max_queued,
                max_attempts=max_attempts,
                webhook_url=webhook_url,
                webhook_mode=webhook_mode,
            )
            if idem is not None:
                body = build_response(submission.job) if build_response else None
                idempotency.attach_in(
                    conn,
                    account_id,
                    idem.key,
                    job_id=submission.job.id,
                    status_code=response_status if body is not None else None,
                    response=body,
                )
            return submission

    try:
        submission = transaction()
    except IntegrityError:
        if idem is None:
            raise
        first = replay(db, account_id, idem)
        if first is None:
            raise
        log.info("Idempotency-Key race on %s: answered with the first request's job", account_id)
        return first
    body = build_response(submission.job) if build_response else None
    return Submitted(submission.job, submission.balance, False, body)


Refusal = QueueLimitReached | InsufficientBalance
# One submit's answer in a batch: its job, its refusal, or the store's failure in its place.
Answer = Submitted | Refusal | StoreUnavailable


def submit_many(
    db: Database,
    *,
    account_id: str,
    new_jobs: list[jobs.NewJob],
    max_queued: int,
    max_attempts: int,
) -> list[Answer]:
    """Submits of one account without idempotency keys, each answered as if it had run alone
    in this order: a refused one gets its error in its place in the list. When they all fit,
    one transaction takes them all (`jobs.submit_many`); when they do not, nothing is written
    and they go one by one, so each gets exactly the answer it would have had. A store that
    cannot be reached raises for all of them (their one transaction did not commit, or is in
    doubt); once they go one by one, a store lost midway answers StoreUnavailable in the
    places of the submits it stopped, after the answers of those that committed."""

    def together(batch: list[jobs.NewJob]) -> list[Answer]:
        made = jobs.submit_many(
            db,
            account_id=account_id,
            new_jobs=batch,
            max_queued=max_queued,
            max_attempts=max_attempts,
        )
        return [Submitted(m.job, m.balance, False) for m in made]

    try:
        return together(new_jobs)
    except (QueueLimitReached, InsufficientBalance) as refusal:
        if len(new_jobs) == 1:
            return [refusal]
    # Not all of them fit; some may.
    answers: list[Answer] = []
    for new in new_jobs:
        try:
            answers.extend(together([new]))
        except (QueueLimitReached, InsufficientBalance) as refusal:
            answers.append(refusal)
        except StoreUnavailable as lost:
            # The ones before it committed and keep their answers (a 503 would tell them
            # "nothing was written"); this one has the store's verdict (maybe in doubt), the
            # rest were never sent.
            answers.append(lost)
            answers.extend(StoreUnavailable() for _ in new_jobs[len(answers) :])
            break
    return answers
