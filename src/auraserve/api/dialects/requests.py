"""Routes on a request that every dialect shares: cancel and the live status stream, plus the
helpers that wait for a job (the sync dialects) and render its status with webhook attempts.

Waiting never busy-polls the database: a waiter watches the store's event bus
(`db.bus.watch(job_id)`, fed by in-process events and, on PostgreSQL, by LISTEN/NOTIFY from
other processes) and re-reads the job when woken. A fallback re-check every second covers a
lost notification, so that costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from auraserve.api.auth import CurrentAccount
from auraserve.api.errors import use_dialect
from auraserve.api.openapi import ERRORS_QUEUE, StatusBody, error_responses
from auraserve.api.store_calls import call_store
from auraserve.api.submit import runtime_of
from auraserve.core.jobs import Job, split_request_id
from auraserve.core.status import status_body
from auraserve.errors import AuraserveError, RequestNotFound
from auraserve.runtime import Runtime
from auraserve.store import jobs
from auraserve.webhooks import outbox

FALLBACK_RECHECK_SECONDS = 1.0


router = APIRouter(tags=["requests (all dialects)"], dependencies=[Depends(use_dialect("queue"))])


class RequestConflict(AuraserveError):
    status_code = 409
    title = "Conflict"

    def __init__(self, message: str, extra: dict[str, Any]) -> None:
        self.extra = extra
        super().__init__(message)


def load_job(runtime: Runtime, account_id: str, request_id: str) -> Job:
    """The account's job named by a public request id; 404 for anything else (another
    account's id looks exactly like a missing one: 404, never 403)."""
    parts = split_request_id(request_id)
    job = jobs.get(runtime.db, parts[1], account_id=account_id) if parts else None
    if job is None or parts is None or job.model_id != parts[0]:
        raise RequestNotFound(f"Request '{request_id[:200]}' not found")
    return job


def render_status(runtime: Runtime, job: Job) -> dict[str, Any]:
    """The status object (core.status.status_body) plus, for jobs with a webhook, the
    delivery attempts. Blocking: call from a thread."""
    body = status_body(job, runtime.settings.resolved_public_url)
    section = outbox.webhook_section(runtime.db, job)
    if section is not None:
        body["webhook"] = section
    return body


def _reload(runtime: Runtime, job: Job) -> Job:
    fresh = jobs.get(runtime.db, job.id, account_id=job.account_id)
    return fresh if fresh is not None else job


async def wait_until_terminal(
    request: Request, runtime: Runtime, job: Job, timeout: float
) -> Job | None:
    """The job once it is terminal, or None after `timeout` seconds (or when the client
    disconnected: nobody is left to answer; the job goes on and stays pollable)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with runtime.db.bus.watch(job.id) as changed:
        while True:
            changed.clear()  # before reading: a change after the read wakes us
            job = await call_store(runtime, _reload, runtime, job)
            if job.is_terminal:
                return job
            remaining = deadline - loop.time()
            if remaining <= 0 or await request.is_disconnected():
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(FALLBACK_RECHECK_SECONDS, remaining))


def _status_responses() -> dict[int | str, dict[str, Any]]:
    return error_responses(ERRORS_QUEUE, 401, 404)


@router.get(
    "/v2/requests/status/{request_id}/stream",
    summary="Live status as server-sent events",
    description=(
        "A `text/event-stream` of status objects (`data: <json>`, the same object as "
        "`GET /v2/requests/status/{request_id}`), one per change, ending after a terminal "
        "status. A `: keep-alive` comment is sent when nothing changed for a while."
    ),
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The event stream",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **_status_responses(),
    },
)
async def stream(request_id: str, request: Request, account: CurrentAccount) -> Response:
    runtime = runtime_of(request)
    job = await call_store(runtime, load_job, runtime, account.id, request_id)
    return StreamingResponse(
        _events(request, runtime, job),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(request: Request, runtime: Runtime, job: Job) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    keepalive = runtime.settings.sse_keepalive_seconds
    last_sent: str | None = None
    last_write = loop.time()
    with runtime.db.bus.watch(job.id) as changed:
        while True:
            changed.clear()
            job = await call_store(runtime, _reload, runtime, job)
            body = await call_store(runtime, render_status, runtime, job)
            text = json.dumps(body, separators=(",", ":"))
            if text != last_sent:
                last_sent = text
                last_write = loop.time()
                yield f"data: {text}\n\n"
            if job.is_terminal:
                return
            if loop.time() - last_write >= keepalive:
                last_write = loop.time()
                yield ": keep-alive\n\n"
            # A client that goes away ends this generator: Starlette cancels the response.
            wait = min(FALLBACK_RECHECK_SECONDS, keepalive - (loop.time() - last_write))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.01, wait))


async def _cancel(request_id: str, request: Request, account: CurrentAccount) -> Response:
    runtime = runtime_of(request)
    parts = split_request_id(request_id)
    result = None
    if parts is not None:
        result = await call_store(runtime, jobs.cancel, runtime.db, parts[1], account_id=account.id)
    if result is None or parts is None or result.job.model_id != parts[0]:
        raise RequestNotFound(f"Request '{request_id[:200]}' not found")
    job = result.job
    if result.outcome == "finished":
        raise RequestConflict(
            f"Request already finished with status {job.status.value}; nothing to cancel",
            {"status": job.status.value, "request_id": job.request_id},
        )
    body = await call_store(runtime, render_status, runtime, job)
    if result.outcome == "requested":
        body["cancel_requested"] = True
        return JSONResponse(body, status_code=202)
    return JSONResponse(body, status_code=200)


for _method in ("POST", "PUT"):
    router.add_api_route(
        "/v2/requests/{request_id}/cancel",
        _cancel,
        methods=[_method],
        operation_id=f"cancel_request_{_method.lower()}",
        summary="Cancel a request",
        description=(
            "A queued request is cancelled at once and its credits released (200). A running "
            "one is flagged and stops at its next step (202); its final status is CANCELLED, "
            "not charged. A finished request answers 409 with its status."
        ),
        response_model=StatusBody,
        responses={
            202: {
                "model": StatusBody,
                "description": "Cancellation requested; the job stops at its next step",
            },
            **error_responses(ERRORS_QUEUE, 401, 404, 409),
        },
    )
