"""Response models for the OpenAPI document. Routes build their bodies by hand (the status
object comes from `core.status`), so these models only *describe* them; a Schemathesis run in
the test suite checks that every response matches what is declared here."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from auraserve.core.request import GenerationRequest


class ErrorBody(BaseModel):
    """Seed 002 / seed 000 error shape."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="Short title, e.g. 'Insufficient Balance'")
    message: str = Field(description="What went wrong and what to do")
    field: str | None = Field(None, description="The parameter or header at fault")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error shape, which its SDKs turn into typed exceptions."""

    error: OpenAIErrorDetail


class Output(BaseModel):
    media_url: list[str]
    media_type: str


class Progress(BaseModel):
    step: int
    total_steps: int
    total: int
    percent: float


class LogLine(BaseModel):
    timestamp: str | None
    message: str


class WebhookDelivery(BaseModel):
    event_id: str = Field(description="The Standard Webhooks webhook-id (same on every retry)")
    status: str | None = Field(description="The job status this callback reports")
    terminal: bool
    state: str = Field(description="pending | delivered | failed | gone | superseded")
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: str | None
    created_at: str | None
    updated_at: str | None


class WebhookSection(BaseModel):
    url: str
    mode: str
    deliveries: list[WebhookDelivery]


class StatusBody(BaseModel):
    """`GET /v2/requests/status/{request_id}`; webhooks POST the same object."""

    model_config = ConfigDict(extra="allow")

    request_id: str
    status: str = Field(description="QUEUED, PROCESSING, COMPLETED, FAILED, ERROR or CANCELLED")
    model_id: str
    error: str | None
    output: Output | None
    created_at: str | None
    updated_at: str | None
    completed_at: str | None
    queue_position: int | None = Field(None, description="Jobs ahead of this one (QUEUED only)")
    progress: Progress | None = None
    logs: list[LogLine] | None = None
    seeds: list[int] | None = None
    width: int | None = None
    height: int | None = None
    prompt: str | None = None
    warnings: list[str] | None = None
    metrics: dict[str, Any] | None = None
    webhook: WebhookSection | None = Field(
        None, description="Callback attempts, when a webhook is set"
    )
    cancel_requested: bool | None = None


_DESCRIPTIONS = {
    400: "Invalid parameter (the body names the field)",
    401: "Missing, invalid or revoked API key",
    402: "Insufficient balance",
    404: "No such request, model or URL",
    406: "Not enough credits (seed 000)",
    409: "The request already finished",
    413: "Request body too large",
    415: "Unsupported Content-Type",
    422: "Idempotency-Key reused with a different request",
    429: "Rate limit or jobs-in-flight limit reached (see Retry-After and RateLimit-*)",
    500: "The engine failed; nothing was charged",
    504: "Still running after the sync timeout; poll the request_id",
}


def error_responses(model: type[BaseModel], *codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error `codes`, each with the dialect's error body `model`."""
    return {code: {"model": model, "description": _DESCRIPTIONS[code]} for code in codes}


def request_body_model(
    name: str,
    fields: Mapping[str, str],
    *,
    doc: str,
    defaults: Mapping[str, Any] | None = None,
    own: Mapping[str, tuple[Any, Any]] | None = None,
    required: Collection[str] = ("prompt",),
) -> type[BaseModel]:
    """A dialect's request body, derived from GenerationRequest: each dialect field (`fields`:
    its name → the canonical one) gets the canonical field's type, range and enum, so the
    document cannot disagree with what `core.request` enforces. `defaults` (canonical names)
    are named in the descriptions; `own` adds fields only this dialect has."""
    definitions: dict[str, Any] = {}
    for public, canonical in fields.items():
        info = GenerationRequest.model_fields[canonical]
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        description = info.description or ""
        if defaults and canonical in defaults:
            description = f"{description} Default: {defaults[canonical]}.".strip()
        if canonical in required:
            definitions[public] = (annotation, Field(description=description or None))
        else:
            definitions[public] = (
                Optional[annotation],  # noqa: UP045 (the annotation is a runtime value)
                Field(None, description=description or None),
            )
    definitions.update(own or {})
    model: type[BaseModel] = create_model(name, __doc__=doc, **definitions)
    return model
