"""`Job.from_row` parses the stored request at its first read, not when the row is read (a
status poll never needs it); the Job behaves as if it had been parsed at once."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

from auraserve.core.jobs import Job, JobStatus
from auraserve.core.presets import default_presets
from auraserve.core.request import GenerationRequest, build_request

MODEL = "auraflow-v0-3-512"


def _request(prompt: str = "a lighthouse") -> GenerationRequest:
    fields = {"prompt": prompt, "seed": 7}  # a fixed seed: two calls build equal requests
    return build_request(fields, model=MODEL, preset=default_presets()[MODEL])


def _row(request: GenerationRequest, **changes: Any) -> SimpleNamespace:
    values: dict[str, Any] = {
        "id": "0" * 36,
        "account_id": "acct",
        "model_id": MODEL,
        "status": "QUEUED",
        "priority": 0,
        "params": request.model_dump_json(),
        "price": 2,
        "attempts": 0,
        "max_attempts": 3,
        "lease_owner": None,
        "progress_step": 0,
        "progress_total": 25,
        "cancel_requested": 0,  # SQLite's boolean
        "error": None,
        "output": None,
        "logs": None,
        "engine_seconds": None,
        "webhook_url": None,
        "webhook_mode": None,
        "created_at": 1.5,
        "updated_at": 2.5,
        "started_at": None,
        "completed_at": None,
    }
    values.update(changes)
    return SimpleNamespace(**values)


def _eager(row: SimpleNamespace) -> Job:
    """The Job as `from_row` built it before: every field given, the request parsed."""
    return Job(
        id=row.id,
        account_id=row.account_id,
        model_id=row.model_id,
        status=JobStatus(row.status),
        priority=row.priority,
        request=GenerationRequest.model_validate_json(row.params),
        price=row.price,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        lease_owner=row.lease_owner,
        progress_step=row.progress_step,
        progress_total=row.progress_total,
        cancel_requested=bool(row.cancel_requested),
        error=row.error,
        output=None,
        logs=[],
        engine_seconds=row.engine_seconds,
        webhook_url=row.webhook_url,
        webhook_mode=row.webhook_mode,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        completed_at=row.completed_at,
    )


def test_a_job_from_a_row_equals_one_built_with_its_parsed_request() -> None:
    row = _row(_request())
    lazy = Job.from_row(row, queue_position=4)
    assert lazy == _eager(row)
    assert repr(lazy) == repr(_eager(row)).replace("queue_position=None", "queue_position=4")
    assert lazy.request == _request()
    assert lazy.request is lazy.request  # parsed once, then kept
    assert lazy.cancel_requested is False


def test_the_request_is_parsed_only_when_read() -> None:
    # A row whose stored request is unreadable still gives a Job; reading the request raises,
    # as from_row itself used to.
    job = Job.from_row(_row(_request(), params='{"prompt": 5}'))
    assert job.status == JobStatus.QUEUED
    with pytest.raises(ValueError, match="validation error"):
        _ = job.request


def test_the_job_stays_frozen_and_replaceable() -> None:
    job = Job.from_row(_row(_request()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.request = _request("another")  # type: ignore[misc]
    other = _request("another")
    replaced = dataclasses.replace(job, request=other)
    assert replaced.request is other and replaced.id == job.id
    assert job.request == _request()
    kept = dataclasses.replace(job, status=JobStatus.PROCESSING)
    assert kept.request == job.request
    assert dataclasses.asdict(job)["request"] == job.request
