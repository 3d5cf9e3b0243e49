"""The writing side of the outbox: what runs inside the transaction of a status change.

`install` registers a transition hook on a `Store`, so the `webhook_deliveries` row is
inserted in the *same* transaction as the status change it reports, in any process that
changes job statuses (API: cancels; workers: results). A crash can therefore never lose a
callback for a status that committed, nor send one for a status that rolled back.

Modes (Queue API `X-Webhook-Mode`): `terminal` records one delivery at the final status; `sync`
also records progress, at most one per `WebhookSettings.sync_interval`. Event ids name the
state they report (`…_p<attempt>_<step>`) and are unique, so two writers recording the same
state insert one row.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Connection, select, update

from auraserve.core.jobs import Job, JobStatus
from auraserve.core.status import MediaUrl, status_body
from auraserve.store.db import Store, TransitionHook, store_of
from auraserve.store.events import emit_in
from auraserve.store.previews import PREVIEWS_WEBHOOK_MODE, newest_in
from auraserve.store.schema import webhook_deliveries
from auraserve.webhooks.settings import WebhookSettings

__all__ = [
    "DELIVERED",
    "FAILED",
    "GONE",
    "MODES",
    "OUTBOX_KEY",
    "OUTBOX_KIND",
    "PENDING",
    "SUPERSEDED",
    "SYNC_MODE",
    "TERMINAL_MODE",
    "enqueue_in",
    "event_id",
    "install",
    "progress_suffix",
    "recent_progress_in",
    "transition_hook",
]

TERMINAL_MODE = "terminal"
SYNC_MODE = "sync"
MODES = (TERMINAL_MODE, SYNC_MODE)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"  # the retry schedule ran out
GONE = "gone"  # the receiver answered 410 (or the URL can never work): disabled for the job
SUPERSEDED = "superseded"  # a newer progress update replaced this one before it was sent

# The outbox wakes its dispatcher through the store's event bus under this pseudo job id
# (PostgreSQL NOTIFY carries it to every API replica).
OUTBOX_KIND = "webhook"
OUTBOX_KEY = "__webhook_outbox__"

_W = webhook_deliveries.c


def install(db: Store, settings: WebhookSettings, *, media_url: MediaUrl) -> None:
    """Record deliveries for every status change made through `db`. Call once per `db`.
    `media_url` renders the image URLs in the bodies (the process's media store)."""
    db.on_transition(transition_hook(settings, media_url=media_url))


def transition_hook(settings: WebhookSettings, *, media_url: MediaUrl) -> TransitionHook:
    """The hook `install` registers, closed over what it records deliveries with."""

    def on_transition(conn: Connection, job: Job) -> None:
        if job.webhook_url is None:
            return
        if job.is_terminal:
            enqueue_in(
                conn,
                job,
                suffix=job.status.value.lower(),
                terminal=True,
                media_url=media_url,
            )
            return
        if not sends_progress(job.webhook_mode):
            return
        # The first callback (accepted) is never throttled.
        first = job.status == JobStatus.QUEUED and job.attempts == 0
        if first or not recent_progress_in(conn, job.id, time.time() - settings.sync_interval):
            enqueue_in(
                conn,
                job,
                suffix=progress_suffix(job),
                terminal=False,
                media_url=media_url,
            )

    return on_transition


def sends_progress(mode: str | None) -> bool:
    """Whether a job's webhooks report progress (mode sync, with or without previews)."""
    return mode in (SYNC_MODE, PREVIEWS_WEBHOOK_MODE)


def event_id(job_id: str, suffix: str) -> str:
    return f"msg_{job_id}_{suffix}"


def progress_suffix(job: Job) -> str:
    """The event id suffix of a progress callback: names the state it reports."""
    if job.status == JobStatus.QUEUED:
        return f"q{job.attempts}"
    return f"p{job.attempts}_{job.progress_step}"


def recent_progress_in(conn: Connection, job_id: str, since: float) -> bool:
    """Whether a progress delivery of `job_id` was recorded after `since`."""
    return (
        conn.execute(
            select(_W.id)
            .where(_W.job_id == job_id, _W.terminal.is_(False), _W.created_at > since)
            .limit(1)
        ).first()
        is not None
    )


def _insert_ignoring_duplicates(conn: Connection, values: dict[str, Any]) -> bool:
    """Insert a delivery unless its event_id exists; True if inserted."""
    return store_of(conn).driver.insert_ignoring(conn, webhook_deliveries, values, ["event_id"])


def enqueue_in(
    conn: Connection,
    job: Job,
    *,
    suffix: str,
    terminal: bool,
    media_url: MediaUrl,
    body: dict[str, Any] | None = None,
) -> bool:
    """Add a delivery of `job`'s current status (in the caller's transaction); True if added.

    `media_url` renders the image URLs of the status body (when `body` is None)."""
    if job.webhook_url is None:
        return False
    now = time.time()
    disabled = conn.execute(
        select(_W.id).where(_W.job_id == job.id, _W.state == GONE).limit(1)
    ).first()
    if disabled is not None:
        return False
    if body is None:
        body = status_body(job, media_url)
        if job.webhook_mode == PREVIEWS_WEBHOOK_MODE and not terminal:
            preview = newest_in(conn, job.id)
            if preview is not None:  # the images as they stood at `step`: small JPEGs
                body["preview"] = {
                    "step": preview.step,
                    "images": [f"data:image/jpeg;base64,{i}" for i in preview.images],
                }
    inserted = _insert_ignoring_duplicates(
        conn,
        {
            "job_id": job.id,
            "account_id": job.account_id,
            "url": job.webhook_url,
            "event_id": event_id(job.id, suffix),
            "payload": json.dumps(body, separators=(",", ":")),
            "terminal": terminal,
            "state": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        },
    )
    if inserted:
        # An older progress update still waiting is stale now: send only the newest.
        conn.execute(
            update(webhook_deliveries)
            .where(
                _W.job_id == job.id,
                _W.state == PENDING,
                _W.terminal.is_(False),
                _W.event_id != event_id(job.id, suffix),
            )
            .values(state=SUPERSEDED, updated_at=now)
        )
        emit_in(conn, OUTBOX_KIND, OUTBOX_KEY)
    return inserted
