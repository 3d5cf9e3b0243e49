"""The reading side of the outbox: how a job's callbacks fared, for its status body."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, select

from auraserve.core.jobs import Job
from auraserve.core.status import iso
from auraserve.store.db import Store
from auraserve.store.previews import PREVIEWS_WEBHOOK_MODE
from auraserve.store.schema import webhook_deliveries
from auraserve.webhooks.outbox.transaction import PENDING, SYNC_MODE, TERMINAL_MODE

__all__ = ["deliveries_in", "webhook_section"]

_SECTION_LIMIT = 50  # deliveries shown in a status body's `webhook` section

_W = webhook_deliveries.c


def deliveries_in(conn: Connection, job_id: str) -> list[dict[str, Any]]:
    """The newest deliveries of `job_id` (at most 50), oldest first."""
    rows = conn.execute(
        select(webhook_deliveries)
        .where(_W.job_id == job_id)
        .order_by(_W.id.desc())
        .limit(_SECTION_LIMIT)
    ).all()
    out = []
    for r in reversed(rows):
        try:
            reported = json.loads(r.payload).get("status")
        except (ValueError, AttributeError):
            reported = None
        out.append(
            {
                "event_id": r.event_id,
                "status": reported,
                "terminal": bool(r.terminal),
                "state": r.state,
                "attempts": r.attempts,
                "last_status_code": r.last_status_code,
                "last_error": r.last_error,
                "next_attempt_at": iso(r.next_attempt_at) if r.state == PENDING else None,
                "created_at": iso(r.created_at),
                "updated_at": iso(r.updated_at),
            }
        )
    return out


def webhook_section(db: Store, job: Job) -> dict[str, Any] | None:
    """The `webhook` part of a status body: where callbacks go and how each one fared."""
    if job.webhook_url is None:
        return None
    with db.read() as conn:
        deliveries = deliveries_in(conn, job.id)
    section: dict[str, Any] = {
        "url": job.webhook_url,
        "mode": job.webhook_mode or TERMINAL_MODE,
        "deliveries": deliveries,
    }
    if job.webhook_mode == PREVIEWS_WEBHOOK_MODE:  # stored apart; shown as the client asked
        section.update(mode=SYNC_MODE, previews=True)
    return section
