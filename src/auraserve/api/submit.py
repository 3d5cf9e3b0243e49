"""The one submit path every dialect uses once it has a validated GenerationRequest.

Order: idempotent replay (a retry costs nothing, not even rate budget) → requests-per-minute
limit → the store's one submit operation (`store.submissions.submit`), through the app's
`SubmitBatcher`: a keyed submit as a batch of one (its key, the jobs-in-flight limit, the
credits and the job in one transaction), others in whatever batch of the account's submits
the store is taking. Dialects only decide how the resulting `Submitted` is shown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from auraserve.api import idempotency, outage
from auraserve.api.dialect import Dialect
from auraserve.api.ratelimit import concurrency_refusal
from auraserve.api.state import api_state
from auraserve.core.jobs import request_id
from auraserve.core.request import GenerationRequest
from auraserve.errors import QueueLimitReached, StoreUnavailable
from auraserve.runtime import Runtime
from auraserve.store import jobs, ledger, submissions
from auraserve.store.jobs import NewJob
from auraserve.store.keys import Account
from auraserve.store.submissions import IdempotencyKey, ResponseBuilder, Submitted


@dataclass(frozen=True)
class Webhook:
    url: str
    mode: str


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
) -> tuple[Submitted, dict[str, str]]:
    """Submit `gen` for `account`, or replay the submit its Idempotency-Key already made;
    with the headers to answer with (the rate limit's, or Idempotent-Replayed)."""
    settings, store = runtime.settings, runtime.db
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
        idem = IdempotencyKey(key, digest, settings.idempotency_ttl_seconds, build_response, 202)
        first = await store.call(submissions.replay, store, account.id, idem)
        if first is not None:
            return first, {"Idempotent-Replayed": "true"}

    headers: dict[str, str] = {}
    limiter = api_state(request).limiter
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
        submitted = await api_state(request).submits.submit(
            account.id,
            new_job,
            max_queued=max_in_flight,
            max_attempts=settings.max_attempts,
            idem=idem,
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
        return submitted, {"Idempotent-Replayed": "true"}
    return submitted, headers


async def _settle_doubt(
    runtime: Runtime, account: Account, new_job: NewJob, cut_off: StoreUnavailable
) -> Submitted:
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
    return Submitted(job, balance)


async def remaining_credits(runtime: Runtime, account: Account) -> str:
    """The x-remaining-credits value (the Sync API's header) for `account`, read now."""
    return str(await runtime.db.call(ledger.balance, runtime.db, account.id))
