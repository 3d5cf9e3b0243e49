"""The one submit path every dialect uses once it has a validated GenerationRequest.

Order: idempotent replay (a retry costs nothing, not even rate budget) → requests-per-minute
limit → one transaction that takes the idempotency key, checks the jobs-in-flight limit,
reserves credits and inserts the job (and, through the transition hook, its first webhook
delivery). Dialects only decide how the resulting job is shown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from sqlalchemy.exc import IntegrityError

from auraserve.api import idempotency
from auraserve.api.ratelimit import RateLimiter, concurrency_refusal
from auraserve.api.store_calls import call_store
from auraserve.core.jobs import Job
from auraserve.core.request import GenerationRequest
from auraserve.errors import QueueLimitReached, RequestNotFound
from auraserve.runtime import Runtime
from auraserve.store import idempotency as idem_store
from auraserve.store import jobs, ledger
from auraserve.store.keys import Account

log = logging.getLogger(__name__)

# Builds the response body a queue-style submit returns, so a replay can return it verbatim.
ResponseBuilder = Callable[[Job], dict[str, Any]]


@dataclass(frozen=True)
class Webhook:
    url: str
    mode: str


@dataclass(frozen=True)
class Accepted:
    job: Job
    balance: int
    replayed: bool
    # The first response's body when the dialect stored one (queue dialect).
    response: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def limiter_of(request: Request) -> RateLimiter | None:
    return runtime_of(request).limiter


async def accept(
    request: Request,
    account: Account,
    gen: GenerationRequest,
    *,
    dialect: str,
    raw_fields: Mapping[str, Any],
    webhook: Webhook | None = None,
    build_response: ResponseBuilder | None = None,
) -> Accepted:
    """Submit `gen` for `account`, or replay the submit its Idempotency-Key already made."""
    runtime = runtime_of(request)
    settings = runtime.settings
    key = idempotency.key_of(request)
    digest = None
    if key is not None:
        digest = idempotency.fingerprint(
            dialect,
            request.url.path,
            raw_fields,
            webhook_url=webhook.url if webhook else None,
            webhook_mode=webhook.mode if webhook else None,
        )
        replay = await _replay(runtime, account, key, digest)
        if replay is not None:
            return replay

    headers: dict[str, str] = {}
    limiter = limiter_of(request)
    max_in_flight = account.max_queued or settings.max_queued_per_account
    concurrent = 0
    if limiter is not None:
        quota = await limiter.hit(account)
        if quota is not None:
            headers.update(quota.headers())
        concurrent = limiter.max_concurrent(account)
        if concurrent > 0:
            max_in_flight = min(max_in_flight, concurrent)

    preset = settings.presets[gen.model]

    def transaction() -> jobs.Submission:
        with runtime.db.write() as conn:
            if key is not None and digest is not None:
                idem_store.claim_in(
                    conn, account.id, key, digest, ttl=settings.idempotency_ttl_seconds
                )
            submission = jobs.submit_in(
                conn,
                account_id=account.id,
                request=gen,
                price=gen.price(preset),
                max_queued=max_in_flight,
                max_attempts=settings.max_attempts,
                webhook_url=webhook.url if webhook else None,
                webhook_mode=webhook.mode if webhook else None,
            )
            if key is not None:
                body = build_response(submission.job) if build_response else None
                idem_store.attach_in(
                    conn,
                    account.id,
                    key,
                    job_id=submission.job.id,
                    status_code=202 if body is not None else None,
                    response=body,
                )
            return submission

    try:
        submission = await call_store(runtime, transaction)
    except IntegrityError:
        # A concurrent request with the same key committed first: answer with its job.
        if key is None or digest is None:
            raise
        replay = await _replay(runtime, account, key, digest)
        if replay is None:
            raise
        log.info("Idempotency-Key race on %s: answered with the first request's job", account.id)
        return replay
    except QueueLimitReached as exc:
        if 0 < concurrent <= (account.max_queued or settings.max_queued_per_account):
            raise concurrency_refusal(concurrent, exc.message, exc.retry_after) from None
        raise
    body = build_response(submission.job) if build_response else None
    return Accepted(submission.job, submission.balance, False, body, headers)


async def _replay(runtime: Runtime, account: Account, key: str, digest: str) -> Accepted | None:
    settings = runtime.settings
    stored = await call_store(
        runtime,
        idem_store.lookup,
        runtime.db,
        account.id,
        key,
        ttl=settings.idempotency_ttl_seconds,
    )
    if stored is None:
        return None
    if stored.request_hash != digest:
        raise idempotency.IdempotencyKeyReused(key)
    if stored.job_id is None:  # cannot happen: the key and its job commit together
        return None
    job = await call_store(runtime, jobs.get, runtime.db, stored.job_id, account_id=account.id)
    if job is None:
        raise RequestNotFound("The request this Idempotency-Key made no longer exists")
    balance = await call_store(runtime, ledger.balance, runtime.db, account.id)
    return Accepted(job, balance, True, stored.response, {"Idempotent-Replayed": "true"})


async def remaining_credits(request: Request, account: Account) -> str:
    """The x-remaining-credits value (seed 000) for `account`, read now."""
    runtime = runtime_of(request)
    return str(await call_store(runtime, ledger.balance, runtime.db, account.id))
