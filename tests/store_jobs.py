"""One way for tests to put a job in the queue through the store (no HTTP), as a worker or a
sweep will find it."""

from __future__ import annotations

from typing import Any

from auraserve.core.presets import default_presets
from auraserve.core.request import build_request
from auraserve.store import jobs
from auraserve.store.db import Database

MODEL = "auraflow-v0-3-512"


def submit_job(
    db: Database,
    account_id: str,
    fields: dict[str, Any] | None = None,
    *,
    model: str = MODEL,
    max_queued: int = 100,
) -> str:
    """Queue a job of `account_id` with `fields` (canonical names; a prompt by default), priced
    and reserved as the API would; returns its id."""
    preset = default_presets()[model]
    request = build_request({"prompt": "a test", **(fields or {})}, model=model, preset=preset)
    return jobs.submit(
        db,
        account_id=account_id,
        request=request,
        price=request.price(preset),
        max_queued=max_queued,
        max_attempts=3,
    ).job.id
