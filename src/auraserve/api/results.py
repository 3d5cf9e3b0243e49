"""What every dialect does with a submitted job: wait for it, load it, render its status and
read its images. Shared by the dialects and the request routes, owned by none of them.

Waiting never busy-polls the database: a waiter watches the store's event bus
(`db.bus.watch(job_id)`, fed by in-process events and, on PostgreSQL, by LISTEN/NOTIFY from
other processes) and re-reads the job when woken. A fallback re-check every second covers a
lost notification, so that costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from auraserve.api import outage
from auraserve.core.jobs import Job, JobStatus, split_request_id
from auraserve.core.status import status_body
from auraserve.errors import (
    GenerationError,
    GenerationFailed,
    RequestCancelled,
    RequestNotFound,
    StoreUnavailable,
    SyncTimeout,
)
from auraserve.runtime import Runtime
from auraserve.store import ledger, workers
from auraserve.webhooks import outbox

log = logging.getLogger(__name__)

FALLBACK_RECHECK_SECONDS = 1.0


async def load_job(runtime: Runtime, account_id: str, request_id: str) -> Job:
    """The account's job named by a public request id; 404 for anything else (another
    account's id looks exactly like a missing one: 404, never 403). The one status read of
    every route and the poll's fast path: the store's `JobReader` (on the event loop, no
    SQLAlchemy per call)."""
    parts = split_request_id(request_id)
    job = await runtime.db.job_reads.get(parts[1], account_id=account_id) if parts else None
    if job is None or parts is None or job.model_id != parts[0]:
        raise RequestNotFound(f"Request '{request_id[:200]}' not found")
    return job


async def status_response(
    runtime: Runtime, account_id: str, request_id: str, *, plain_only: bool = False
) -> JSONResponse | None:
    """The status poll's answer (its route's and its fast path's). A job with a webhook has
    its deliveries rendered through the store: `plain_only` then answers None instead."""
    job = await load_job(runtime, account_id, request_id)
    if job.webhook_url is None:
        # Plain JSON types already; skip FastAPI's generic encoder on this hot path.
        return JSONResponse(await status_of(runtime, job))
    if plain_only:
        return None
    return JSONResponse(await runtime.db.call(render_status, runtime, job))


def plain_status(runtime: Runtime, job: Job) -> dict[str, Any]:
    """The status object (core.status.status_body), plus a `note` on a queued job whose model
    no live worker serves: it waits until one starts, and the client should know. Blocking
    on a miss of the live-models cache (store.workers.live_models, about a second): async
    code calls `status_of` instead."""
    served = None
    if job.status == JobStatus.QUEUED:
        served = workers.live_models(runtime.db, runtime.settings.worker_stale_seconds)
    return _status_body(runtime, job, served)


async def status_of(runtime: Runtime, job: Job) -> dict[str, Any]:
    """`plain_status` for async code: the live models come from the cache, renewed off the
    event loop (`Store.refreshed`), where one blocking read every second held every poll
    in flight behind it (the p99 of bench/scaleout.py's polls)."""
    served = None
    if job.status == JobStatus.QUEUED:
        db, stale_after = runtime.db, runtime.settings.worker_stale_seconds
        served = await runtime.db.refreshed(
            ("live models", stale_after),
            fresh=lambda: workers.cached_live_models(db, stale_after),
            stale=lambda: workers.cached_live_models(db, stale_after, stale_ok=True),
            fetch=lambda: workers.live_models(db, stale_after),
        )
    return _status_body(runtime, job, served)


def _status_body(runtime: Runtime, job: Job, served: frozenset[str] | None) -> dict[str, Any]:
    body = status_body(job, runtime.media.url)
    if served is not None and job.model_id not in served:
        body["note"] = (
            f"no live worker serves model {job.model_id} right now; the request waits "
            "in the queue until one starts"
        )
    return body


def render_status(runtime: Runtime, job: Job) -> dict[str, Any]:
    """`plain_status` plus, for jobs with a webhook, the delivery attempts. Blocking: call
    from a thread."""
    body = plain_status(runtime, job)
    section = outbox.webhook_section(runtime.db, job)
    if section is not None:
        body["webhook"] = section
    return body


async def reload(runtime: Runtime, job: Job) -> Job:
    """`job` as the store has it now, through the one status read."""
    fresh = await runtime.db.job_reads.get(job.id, account_id=job.account_id)
    return fresh if fresh is not None else job


async def wait_until_terminal(
    request: Request, runtime: Runtime, job: Job, timeout: float
) -> Job | None:
    """The job once it is terminal, or None after `timeout` seconds (or when the client
    disconnected: nobody is left to answer; the job goes on and stays pollable).

    The job exists, so a database outage meanwhile is ridden out (the job may finish while
    the store is away; a client told to resend would pay twice): the store is asked again
    every `outage.RETRY_SECONDS` until the timeout, and if it is still away then, the 503
    names the request (`outage.request_was_accepted`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with runtime.db.bus.watch(job.id) as changed:
        while True:
            changed.clear()  # before reading: a change after the read wakes us
            try:
                job = await reload(runtime, job)
            except StoreUnavailable:
                unavailable = True
            else:
                unavailable = False
                if job.is_terminal:
                    return job
            remaining = deadline - loop.time()
            if remaining <= 0 or await request.is_disconnected():
                if unavailable:
                    raise outage.request_was_accepted(runtime, job.request_id)
                return None
            recheck = outage.RETRY_SECONDS if unavailable else FALLBACK_RECHECK_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(recheck, remaining))


async def finished_job(request: Request, runtime: Runtime, job: Job) -> Job:
    """Wait for the job up to the sync timeout; anything but COMPLETED raises (SyncTimeout or
    the JobOutcome of its status), carrying the ids to poll it by."""
    done = await wait_until_terminal(request, runtime, job, runtime.settings.sync_timeout_seconds)
    ids = outage.request_ids(runtime, job.request_id)
    headers = {"x-request-id": job.request_id}
    if done is None:
        raise SyncTimeout(
            f"The image is not ready after {runtime.settings.sync_timeout_seconds:g} s; it is "
            f"still being generated: poll {ids['polling_url']}",
            headers=headers,
            extra=ids,
        )
    if done.status == JobStatus.COMPLETED:
        return done
    if done.status == JobStatus.CANCELLED:
        raise RequestCancelled(
            "The request was cancelled (not charged)", headers=headers, extra=ids
        )
    if done.status == JobStatus.FAILED:
        raise GenerationFailed(f"{done.error} (not charged)", headers=headers, extra=ids)
    raise GenerationError(
        f"Server had some issue with processing: {done.error} (not charged)",
        headers=headers,
        extra=ids,
    )


async def finished_headers(
    runtime: Runtime, account_id: str, job: Job, headers: Mapping[str, str]
) -> dict[str, str]:
    """A finished job's answer's headers: its x-request-id, `headers` and x-remaining-credits,
    left out when the store stays away for `outage.RETRY_SECONDS` × a few: the image is ready
    and paid for, so it is answered without the header rather than with a 503 that would
    invite a resend."""
    answer = {"x-request-id": job.request_id, **headers}
    deadline = asyncio.get_running_loop().time() + 2 * outage.RETRY_SECONDS
    try:
        balance = await outage.ride_out(runtime, deadline, ledger.balance, runtime.db, account_id)
    except StoreUnavailable:
        log.warning("x-remaining-credits left out of %s: the database is away", job.request_id)
    else:
        answer["x-remaining-credits"] = str(balance)
    return answer


def read_images(runtime: Runtime, job: Job) -> list[bytes]:
    """The bytes of a completed job's images. Blocking: call through `Store.call`."""
    assert job.output is not None
    images = []
    for name in job.output["media"]:
        data = runtime.media.get(name)
        if data is None:
            raise GenerationError(
                "The stored image is missing", extra={"request_id": job.request_id}
            )
        images.append(data)
    return images
