"""What a job is, independent of how it is stored or shown."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

from auraserve.core.request import GenerationRequest


class JobStatus(StrEnum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"  # the request could not be fulfilled (not charged)
    ERROR = "ERROR"  # a system fault (not charged), e.g. workers kept dying on it
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.ERROR, JobStatus.CANCELLED})


@dataclass(frozen=True)
class Job:
    id: str
    account_id: str
    model_id: str
    status: JobStatus
    priority: int
    # Parsed on first read when the job comes from a row (see _ParsedOnFirstRead): a status
    # poll renders a job without ever looking at its request.
    request: GenerationRequest
    price: int
    attempts: int
    max_attempts: int
    lease_owner: str | None
    progress_step: int
    progress_total: int
    cancel_requested: bool
    error: str | None
    output: dict[str, Any] | None
    logs: list[list[Any]]
    engine_seconds: float | None
    webhook_url: str | None
    webhook_mode: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    completed_at: float | None
    queue_position: int | None = field(default=None, compare=False)
    # The step this attempt resumed from (a step checkpoint); None when it began at step 0.
    progress_resumed_from: int | None = None

    @property
    def request_id(self) -> str:
        return request_id(self.model_id, self.id)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_row(cls, row: Any, queue_position: int | None = None) -> Job:
        return cls(
            id=row.id,
            account_id=row.account_id,
            model_id=row.model_id,
            status=JobStatus(row.status),
            priority=row.priority,
            request=_stored_request(row.params),
            price=int(row.price),
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            lease_owner=row.lease_owner,
            progress_step=row.progress_step,
            progress_total=row.progress_total,
            cancel_requested=bool(row.cancel_requested),
            error=row.error,
            output=json.loads(row.output) if row.output else None,
            logs=json.loads(row.logs) if row.logs else [],
            engine_seconds=row.engine_seconds,
            webhook_url=row.webhook_url,
            webhook_mode=row.webhook_mode,
            created_at=row.created_at,
            updated_at=row.updated_at,
            started_at=row.started_at,
            completed_at=row.completed_at,
            queue_position=queue_position,
            progress_resumed_from=getattr(row, "progress_resumed_from", None),
        )


class _StoredRequest:
    """A request as stored (its JSON), not parsed yet."""

    __slots__ = ("json",)

    def __init__(self, json: str) -> None:
        self.json = json


def _stored_request(json: str) -> GenerationRequest:
    # Not a GenerationRequest yet, but nobody can see it as anything else: `Job.request`
    # (the descriptor below) parses it at its first read.
    return cast(GenerationRequest, _StoredRequest(json))


class _ParsedOnFirstRead:
    """`Job.request`: holds a `GenerationRequest`, or the stored JSON until its first read,
    which parses it (once; `GenerationRequest.model_validate_json`, as before) and keeps the
    result. Equality, repr and `dataclasses.replace` read it like any field, so a Job behaves
    exactly as if the request had been parsed when the row was read."""

    _slot = "_request"

    def __get__(self, job: Job | None, owner: type | None = None) -> GenerationRequest:
        if job is None:
            raise AttributeError("request")  # the class attribute: dataclasses ask for one
        value = job.__dict__[self._slot]
        if isinstance(value, _StoredRequest):
            value = GenerationRequest.model_validate_json(value.json)
            job.__dict__[self._slot] = value
        return cast(GenerationRequest, value)

    def __set__(self, job: Job, value: GenerationRequest) -> None:
        # Only the dataclass's __init__ gets here: the frozen __setattr__ refuses other writes.
        job.__dict__[self._slot] = value


# Installed after @dataclass has built __init__, eq and repr around a plain `request` field:
# __init__ then stores through the descriptor (object.__setattr__ honours it).
setattr(Job, "request", _ParsedOnFirstRead())  # noqa: B010


def request_id(model_id: str, job_id: str) -> str:
    """The public id: `{model_id}_{uuid}`, as the hosted Queue API writes it."""
    return f"{model_id}_{job_id}"


def split_request_id(value: str) -> tuple[str, str] | None:
    """(model_id, job uuid), or None if `value` is not shaped like one of our ids."""
    model_id, sep, job_id = value.rpartition("_")
    if not sep or not model_id or len(job_id) != 36 or len(value) > 200:
        return None
    return model_id, job_id
