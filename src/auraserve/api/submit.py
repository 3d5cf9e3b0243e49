"""The one submit path every dialect uses once it has a validated GenerationRequest.

Order: idempotent replay (a retry costs nothing, not even rate budget) → requests-per-minute
limit → the store's submit (`store.submissions.submit`: one transaction that takes the
idempotency key, checks the jobs-in-flight limit, reserves credits and inserts the job;
without a key, through the app's `SubmitBatcher`, which lets one transaction take several of
an account's submits while the store is busy).
Dialects only decide how the resulting job is shown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from auraserve.api import idempotency, outage
from auraserve.api.dialect import Dialect
from auraserve.api.ratelimit import concurrency_refusal
from auraserve.api.store_calls import call_store
from auraserve.api.submit_batching import SubmitBatcher
from auraserve.core.jobs import Job, request_id
from auraserve.core.request import GenerationRequest
from auraserve.errors import QueueLimitReached, StoreUnavailable
from auraserve.runtime import Runtime
from auraserve.store import jobs, ledger, submissions
from auraserve.store.jobs import NewJob
from auraserve.store.keys import Account
from auraserve.store.submissions import IdempotencyKey, ResponseBuilder


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


async def accept(
    request: Request,
    runtime: Runtime,
    account: Account,
    gen: GenerationRequest,
    *,
    dialect: Dialect,
    raw_fields: Mapping[str, Any],
    webhook: Webhook | None = None,
    build_response: ResponseBuilder | None = None,
) -> Accepted:
    """Submit `gen` for `account`, or replay the submit its Idempotency-Key already made."""
    settings = runtime.settings
    key = idempotency.key_of(request)
    idem = None
    if key is not None:
        digest = idempotency.fingerprint(
            dialect.name.value,
            request.url.path,
            raw_fields,
            webhook_url=webhook.url if webhook else None,
            webhook_mode=webhook.mode if webhook else None,
        )
        idem = IdempotencyKey(key, digest, settings.idempotency_ttl_seconds)
        first = await call_store(runtime, submissions.replay, runtime.db, account.id, idem)
        if first is not None:
            return _accepted(first, {"Idempotent-Replayed": "true"})

    headers: dict[str, str] = {}
    limiter = runtime.limiter
    max_in_flight = account.max_queued or settings.max_queued_per_account
    concurrent = 0
    if limiter is not None:
        quota = await limiter.hit(account)
        if quota is not None:
            headers.update(quota.headers())
        concurrent = limiter.max_concurrent(account)
        if concurrent > 0:
            max_in_flight = min(max_in_flight, concurrent)

    price = gen.price(settings.presets[gen.model])
    webhook_url, webhook_mode = (webhook.url, webhook.mode) if webhook else (None, None)
    new_job = NewJob(gen, price, webhook_url, webhook_mode)
    try:
        if idem is None:
            batcher: SubmitBatcher = request.app.state.submit_batcher
            submitted = await batcher.submit(
                account.id, new_job, max_queued=max_in_flight, max_attempts=settings.max_attempts
            )
        else:
            submitted = await call_store(
                runtime,
                submissions.submit,
                runtime.db,
                account_id=account.id,
                request=gen,
                price=price,
                max_queued=max_in_flight,
                max_attempts=settings.max_attempts,
                webhook_url=webhook_url,
                webhook_mode=webhook_mode,
                idem=idem,
                build_response=build_response,
                response_status=202,
            )
    except QueueLimitReached as exc:
        # The account's own concurrency cap, not the server's queue limit, stopped it: say so.
        if 0 < concurrent <= (account.max_queued or settings.max_queued_per_account):
            raise concurrency_refusal(concurrent, exc.message, exc.retry_after) from None
        raise
    except StoreUnavailable as exc:
        if not exc.in_doubt:
            raise  # the transaction never reached its COMMIT: nothing was written
        if idem is not None:
            raise outage.keyed_request_may_exist() from exc
        submitted = await _settle_doubt(runtime, account, new_job, exc)
    if submitted.replayed:  # a concurrent submit with the same key committed first
        return _accepted(submitted, {"Idempotent-Replayed": "true"})
    return _accepted(submitted, headers)


async def _settle_doubt(
    runtime: Runtime, account: Account, new_job: NewJob, cut_off: StoreUnavailable
) -> submissions.Submitted:
    """An unkeyed submit whose COMMIT was cut off: whether its job exists, once the store
    answers again (within `outage.IN_DOUBT_SECONDS`). It does: the submit was accepted. It
    does not: the plain 503 (nothing was written). The store stays away: the 503 that names
    the id the job would have, so the client looks before it resends."""
    deadline = asyncio.get_running_loop().time() + outage.IN_DOUBT_SECONDS
    db = runtime.db
    try:
        job = await outage.ride_out(
            runtime, deadline, jobs.get, db, new_job.id, account_id=account.id
        )
    except StoreUnavailable:
        rid = request_id(new_job.request.model, new_job.id)
        raise outage.request_may_exist(runtime, rid) from cut_off
    if job is None:
        raise StoreUnavailable() from cut_off
    try:
        balance = await outage.ride_out(runtime, deadline, ledger.balance, db, account.id)
    except StoreUnavailable:
        raise outage.request_was_accepted(runtime, job.request_id) from cut_off
    return submissions.Submitted(job, balance, False)


def _accepted(submitted: submissions.Submitted, headers: dict[str, str]) -> Accepted:
    return Accepted(
        submitted.job, submitted.balance, submitted.replayed, submitted.response, headers
    )


async def remaining_credits(runtime: Runtime, account: Account) -> str:
    """The x-remaining-credits value (the Sync API's header) for `account`, read now."""
    return str(await call_store(runtime, ledger.balance, runtime.db, account.id))
