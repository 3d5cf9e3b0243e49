"""Submitting jobs: the one submit operation behind every dialect's submit, batched or not.

A submit without an idempotency key joins whatever batch of its account the API sends
(`api.submit_batching`); one with a key is a batch of one. Either way the jobs go in through
`jobs.submit` / `jobs.submit_in` (hence through the one transition point,
`jobs.transitioned_in`) and come back as `Submitted`.

With an idempotency key, the key row, the credit reservation and the job commit together in
one transaction; of two concurrent submits with one key, the second answers with the first
one's job (`store.idempotency`). A key sent again with a different request is refused
(IdempotencyKeyReused).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError

from auraserve.core.jobs import Job
from auraserve.errors import (
    IdempotencyKeyReused,
    InsufficientBalance,
    QueueLimitReached,
    RequestNotFound,
    StoreUnavailable,
)
from auraserve.store import idempotency, jobs, ledger
from auraserve.store.db import Store
from auraserve.store.jobs import NewJob

log = logging.getLogger(__name__)

# Builds the body the first response returned, stored with the key so a replay returns it
# verbatim (dialects whose response is the finished job pass none).
ResponseBuilder = Callable[[Job], dict[str, Any]]


@dataclass(frozen=True)
class IdempotencyKey:
    """A client's key, the fingerprint of the request it was sent with, and what a replay
    answers with: the first response's body (`build`) and status."""

    key: str
    fingerprint: str
    ttl: float
    build: ResponseBuilder | None = None
    status: int | None = None


@dataclass(frozen=True)
class Submitted:
    """What a submit made (or, `replayed`, what its idempotency key's first submit made)."""

    job: Job
    balance: int  # the account's spendable balance right after the submit (or now, on replay)
    replayed: bool = False
    # The first response's body, when the submit stored one.
    response: dict[str, Any] | None = None


Refusal = QueueLimitReached | InsufficientBalance
# One submit's answer in a batch: its job, its refusal, or the store's failure in its place.
Answer = Submitted | Refusal | StoreUnavailable


def replay(store: Store, account_id: str, idem: IdempotencyKey) -> Submitted | None:
    """What the key's earlier submit made, or None when the key is new (or expired).
    Raises IdempotencyKeyReused when the key was sent with another request."""
    with store.read() as conn:
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
    store: Store,
    *,
    account_id: str,
    new_jobs: Sequence[NewJob],
    max_queued: int,
    max_attempts: int,
    idem: IdempotencyKey | None = None,
) -> list[Answer]:
    """Submits of one account, each answered as if it had run alone in this order: a refused
    one gets its error in its place in the list. When they all fit, one transaction takes them
    all; when they do not, nothing is written and they go one by one, so each gets exactly the
    answer it would have had. A store that cannot be reached raises for all of them (their
    one transaction did not commit, or is in doubt); once they go one by one, a store lost
    midway answers StoreUnavailable in the places of the submits it stopped, after the
    answers of those that committed. With `idem`, `new_jobs` is one submit (see the module
    docstring); a concurrent submit that took the key first is answered as a replay."""

    def together(batch: Sequence[NewJob]) -> list[Answer]:
        if idem is not None:
            return [_keyed(store, account_id, batch, max_queued, max_attempts, idem)]
        made, balance = jobs.submit(
            store,
            account_id=account_id,
            new_jobs=batch,
            max_queued=max_queued,
            max_attempts=max_attempts,
        )
        # Each with the balance it would have left alone: the later ones' credits were
        # still there.
        answers: list[Answer] = []
        for job in reversed(made):
            answers.append(Submitted(job, balance))
            balance += job.price
        return answers[::-1]

    if idem is not None and len(new_jobs) != 1:
        raise ValueError("a keyed submit is a batch of one")
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


def _keyed(
    store: Store,
    account_id: str,
    batch: Sequence[NewJob],
    max_queued: int,
    max_attempts: int,
    idem: IdempotencyKey,
) -> Submitted:
    """One keyed submit: the key, the job and its reservation in one transaction."""
    try:
        with store.write() as conn:
            idempotency.claim_in(conn, account_id, idem.key, idem.fingerprint, ttl=idem.ttl)
            made, balance = jobs.submit_in(
                conn,
                account_id=account_id,
                new_jobs=batch,
                max_queued=max_queued,
                max_attempts=max_attempts,
            )
            body = idem.build(made[0]) if idem.build else None
            idempotency.attach_in(
                conn,
                account_id,
                idem.key,
                job_id=made[0].id,
                status_code=idem.status if body is not None else None,
                response=body,
            )
    except IntegrityError:
        first = replay(store, account_id, idem)
        if first is None:
            raise
        log.info("Idempotency-Key race on %s: answered with the first request's job", account_id)
        return first
    return Submitted(made[0], balance, False, body)
