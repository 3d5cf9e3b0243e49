"""One way for tests to put a job in the queue through the store (no HTTP), as a worker or a
sweep will find it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from auraserve.core.lora import LoraSource
from auraserve.core.presets import default_presets
from auraserve.core.request import GenerationRequest, build_request
from auraserve.store import jobs
from auraserve.store.db import Store
from auraserve.store.submissions import Submitted

MODEL = "auraflow-v0-3-512"


def submit_job(
    db: Store,
    account_id: str,
    fields: dict[str, Any] | None = None,
    *,
    model: str = MODEL,
    max_queued: int = 100,
    loras: Mapping[str, LoraSource] | None = None,
) -> str:
    """Queue a job of `account_id` with `fields` (canonical names; a prompt by default), priced
    and reserved as the API would; returns its id. `loras`: the registry LoRA names must be in."""
    preset = default_presets()[model]
    request = build_request(
        {"prompt": "a test", **(fields or {})}, model=model, preset=preset, loras=loras
    )
    made, _ = jobs.submit(
        db,
        account_id=account_id,
        new_jobs=[jobs.NewJob(request, request.price(preset))],
        max_queued=max_queued,
        max_attempts=3,
    )
    return made[0].id


def submit_one(
    db: Store,
    *,
    account_id: str,
    request: GenerationRequest,
    price: int,
    max_queued: int,
    max_attempts: int,
    priority: int = 0,
    webhook_url: str | None = None,
    webhook_mode: str | None = None,
) -> Submitted:
    """One submit through the store's submit (`jobs.submit`, a batch of one); raises its
    refusal (QueueLimitReached, InsufficientBalance)."""
    made, balance = jobs.submit(
        db,
        account_id=account_id,
        new_jobs=[jobs.NewJob(request, price, webhook_url, webhook_mode)],
        max_queued=max_queued,
        max_attempts=max_attempts,
        priority=priority,
    )
    return Submitted(made[0], balance)
