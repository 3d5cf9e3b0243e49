"""Routes on a request that every API shares: cancel and the live status stream. They
answer in the Queue API's shape (`/v2/requests/...` is the Queue API's namespace)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from auraserve.api import results
from auraserve.api.auth import account_for_key, presented_key
from auraserve.api.deps import CurrentAccount, RuntimeDep, use_dialect
from auraserve.api.dialects.queue import QUEUE
from auraserve.api.openapi import REQUESTS_TAG, StatusBody, event_stream_schema
from auraserve.core.jobs import Job, split_request_id
from auraserve.errors import RequestConflict, RequestNotFound, StoreUnavailable, Unauthorized
from auraserve.runtime import Runtime
from auraserve.store import jobs
from auraserve.store import previews as preview_rows

log = logging.getLogger(__name__)

router = APIRouter(tags=[REQUESTS_TAG], dependencies=[use_dialect(QUEUE)])


@router.get(
    "/v2/requests/status/{request_id}/stream",
    summary="Live status as server-sent events",
    description=(
        "A `text/event-stream` of status objects (`data: <json>`, the same object as "
        "`GET /v2/requests/status/{request_id}`), one per change, ending after a terminal "
        "status, or when the server shuts down (reconnect, or poll). When the database "
        "becomes unavailable the last event is `event: error` with the error body and "
        "`retry_after` (seconds): reconnect or poll after it; when its key is revoked, the "
        "last event is `event: error` with the 401 body. With `previews=true`, while the "
        "job runs, `event: preview` events carry `{step, total_steps, images}`: each image "
        "as it stands at that step, a small JPEG data URL, every few steps "
        "(AURASERVE_PREVIEW_EVERY_STEPS); the worker makes them only while such a stream "
        "watches. A `: keep-alive` comment is sent when nothing changed for a while."
    ),
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The event stream",
            "content": {"text/event-stream": {"schema": event_stream_schema(StatusBody)}},
            "headers": {
                "Cache-Control": {"schema": {"type": "string", "enum": ["no-cache"]}},
            },
        },
        **QUEUE.error_responses(401, 404),
    },
)
async def stream(
    request_id: str,
    request: Request,
    runtime: RuntimeDep,
    account: CurrentAccount,
    previews: Annotated[
        bool,
        Query(description="Also send `event: preview` events: the images as they form"),
    ] = False,
) -> Response:
    job = await results.load_job(runtime, account.id, request_id)
    return StreamingResponse(
        _events(request, runtime, job, presented_key(request) or "", previews=previews),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    request: Request, runtime: Runtime, job: Job, key: str, *, previews: bool
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    keepalive = runtime.settings.sse_keepalive_seconds
    last_sent: str | None = None
    last_write = loop.time()
    watched = _Watching(
        runtime, job.id, enabled=previews and runtime.settings.preview_every_steps > 0
    )
    with runtime.db.bus.watch(job.id) as changed:
        while True:
            changed.clear()
            preview = None
            try:
                # A key revoked while its stream is open stops it too (within the key cache's
                # 2 s, like every new request): a cache hit on all but one wake-up a second.
                if await account_for_key(runtime, key) is None:
                    yield _error_event(Unauthorized("Invalid or revoked API key"))
                    return
                job = await results.reload(runtime, job)
                body = await runtime.db.call(results.render_status, runtime, job)
                if not job.is_terminal:
                    preview = await watched.renew_and_read(loop.time())
            except StoreUnavailable as exc:
                # Headers are sent: no status code can say it now. A last event does, and the
                # stream ends as a stream should (not cut mid-body).
                yield _error_event(exc)
                return
            text = json.dumps(body, separators=(",", ":"))
            if text != last_sent:
                last_sent = text
                last_write = loop.time()
                yield f"data: {text}\n\n"
            if preview is not None:
                last_write = loop.time()
                yield _preview_event(preview)
            if job.is_terminal:
                return
            if runtime.stopping.is_set():
                # The process is shutting down: end the stream now (the client reconnects to
                # another replica) instead of holding the graceful shutdown for its whole grace.
                return
            if loop.time() - last_write >= keepalive:
                last_write = loop.time()
                yield ": keep-alive\n\n"
            # A client that goes away ends this generator: Starlette cancels the response.
            wait = min(results.FALLBACK_RECHECK_SECONDS, keepalive - (loop.time() - last_write))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.01, wait))


class _Watching:
    """A stream's interest in previews: it marks its job watched (renewed every
    `RENEW_SECONDS`, lasting `WANT_SECONDS`, so a stream that dies stops the previews soon) and
    reads each preview newer than the last it sent."""

    RENEW_SECONDS = 2.0
    WANT_SECONDS = 6.0

    def __init__(self, runtime: Runtime, job_id: str, *, enabled: bool) -> None:
        self.runtime = runtime
        self.job_id = job_id
        self.enabled = enabled
        self.renewed_at: float | None = None
        self.last_step = 0

    async def renew_and_read(self, now: float) -> preview_rows.Preview | None:
        if not self.enabled:
            return None
        db = self.runtime.db
        if self.renewed_at is None or now - self.renewed_at >= self.RENEW_SECONDS:
            self.renewed_at = now
            await db.call(preview_rows.want, db, self.job_id, seconds=self.WANT_SECONDS)
        preview = await db.call(preview_rows.newest, db, self.job_id, after_step=self.last_step)
        if preview is not None:
            self.last_step = preview.step
        return preview


def _preview_event(preview: preview_rows.Preview) -> str:
    """An SSE `preview` event: the job's images as they stand at `step`, as small JPEGs."""
    body = {
        "step": preview.step,
        "total_steps": preview.total,
        "images": [f"data:image/jpeg;base64,{image}" for image in preview.images],
    }
    return f"event: preview\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


def _error_event(exc: StoreUnavailable | Unauthorized) -> str:
    """An SSE `error` event, the stream's last: the queue dialect's error body; for an outage
    with when to come back."""
    problem = QUEUE.problem(exc)
    body = QUEUE.error_body(problem)
    if isinstance(exc, StoreUnavailable):
        body["retry_after"] = int(problem.headers.get("Retry-After", "1"))
        body["message"] = (
            f"{problem.message}; the stream ends here: reconnect, or poll the status, after "
            f"{body['retry_after']} s"
        )
        log.warning("status stream ended: the database is unavailable")
    return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _cancel(request_id: str, runtime: RuntimeDep, account: CurrentAccount) -> Response:
    parts = split_request_id(request_id)
    result = None
    if parts is not None:
        result = await runtime.db.call(jobs.cancel, runtime.db, parts[1], account_id=account.id)
    if result is None or parts is None or result.job.model_id != parts[0]:
        raise RequestNotFound(f"Request '{request_id[:200]}' not found")
    job = result.job
    if result.outcome == "finished":
        raise RequestConflict(
            f"Request already finished with status {job.status.value}; nothing to cancel",
            extra={"status": job.status.value, "request_id": job.request_id},
        )
    body = await runtime.db.call(results.render_status, runtime, job)
    if result.outcome == "requested":
        body["cancel_requested"] = True
        return JSONResponse(body, status_code=202)
    return JSONResponse(body, status_code=200)


# One route for both methods, so that a 405 (OPTIONS, GET, ...) answers `Allow: POST, PUT`;
# `api.openapi.tidy_document` splits the shared operation id into cancel_request_post / _put.
router.add_api_route(
    "/v2/requests/{request_id}/cancel",
    _cancel,
    methods=["POST", "PUT"],
    operation_id="cancel_request",
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
        **QUEUE.error_responses(401, 404, 409),
    },
)
