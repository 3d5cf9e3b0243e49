"""The Queue API: submit → 202 → poll `/v2/requests/status/{id}`, as the hosted AuraFlow
queue gateway answers.

Mapping only: field names in, status objects out. Every rule lives in `core.request`. Its
error shape, `{"error": title, "message": text}`, is the default one (`api.dialect.Dialect`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from auraserve.api import idempotency, results
from auraserve.api.body import json_object
from auraserve.api.deps import CurrentAccount, RuntimeDep, use_dialect
from auraserve.api.dialect import Dialect, DialectName
from auraserve.api.openapi import QUEUE_TAG, StatusBody, json_request_body, request_body_model
from auraserve.api.submit import Webhook, accept
from auraserve.core.jobs import Job
from auraserve.errors import InvalidParameter
from auraserve.runtime import Runtime
from auraserve.store.previews import PREVIEWS_WEBHOOK_MODE
from auraserve.webhooks import outbox
from auraserve.webhooks.settings import check_webhook_url


class QueueDialect(Dialect):
    name = DialectName.QUEUE
    fields: ClassVar[dict[str, str]] = {
        "prompt": "prompt",
        "negative_prompt": "negative_prompt",
        "num_images": "num_images",
        "guidance_scale": "guidance_scale",
        "num_inference_steps": "steps",
        "expand_prompt": "expand_prompt",
        "exact": "exact",
        "seed": "seed",
        "width": "width",
        "height": "height",
        # Extensions beyond the hosted Queue API (same names as in the Sync API):
        "shift": "shift",
        "sampler": "sampler",
        "scheduler": "scheduler",
        "output_format": "output_format",
        "output_quality": "output_quality",
        "loras": "loras",
        "image": "image",
        "strength": "strength",
    }
    # No defaults of its own: absent fields take the preset's.


QUEUE = QueueDialect()

QueueSubmitBody = request_body_model(
    "QueueSubmitBody",
    QUEUE.fields,
    doc="Documentation of the body; parsing goes through `core.request.build_request`.",
)


class QueueSubmitResponse(BaseModel):
    request_id: str
    status: str
    polling_url: str


router = APIRouter(tags=[QUEUE_TAG], dependencies=[use_dialect(QUEUE)])


WEBHOOK_URL_HEADER = "X-Webhook-URL"
WEBHOOK_MODE_HEADER = "X-Webhook-Mode"
WEBHOOK_PREVIEWS_HEADER = "X-Webhook-Previews"


def webhook_of(request: Request, runtime: Runtime) -> Webhook | None:
    """The Queue API's webhook headers, validated at submit: https only (unless the operator allows
    http for development), no credentials, no literal private addresses."""
    url = request.headers.get(WEBHOOK_URL_HEADER)
    mode = request.headers.get(WEBHOOK_MODE_HEADER)
    if url is None:
        if mode is not None and mode.strip().lower() not in outbox.MODES:
            raise _bad_mode()
        return None
    normalised = check_webhook_url(url.strip(), runtime.settings.outbound)
    chosen = (mode or outbox.TERMINAL_MODE).strip().lower()
    if chosen not in outbox.MODES:
        raise _bad_mode()
    previews = request.headers.get(WEBHOOK_PREVIEWS_HEADER, "false").strip().lower()
    if previews not in ("true", "false"):
        raise InvalidParameter(
            field=WEBHOOK_PREVIEWS_HEADER,
            message=f"{WEBHOOK_PREVIEWS_HEADER}: must be true or false",
            allowed="true, false",
        )
    if previews == "true" and chosen == outbox.SYNC_MODE:
        # Previews ride on progress callbacks: in terminal mode there are none to carry them.
        chosen = PREVIEWS_WEBHOOK_MODE
    return Webhook(url=normalised, mode=chosen)


def _bad_mode() -> InvalidParameter:
    return InvalidParameter(
        field=WEBHOOK_MODE_HEADER,
        message=f"{WEBHOOK_MODE_HEADER}: must be one of: {', '.join(outbox.MODES)}",
        allowed=", ".join(outbox.MODES),
    )


def accepted_body(runtime: Runtime, job: Job) -> dict[str, Any]:
    base = runtime.settings.resolved_public_url
    return {
        "request_id": job.request_id,
        "status": job.status.value,
        "polling_url": f"{base}/v2/requests/status/{job.request_id}",
    }


@router.post(
    "/{model_id}/v1/{name}-request",
    status_code=202,
    response_model=QueueSubmitResponse,
    summary="Submit a generation request",
    openapi_extra=json_request_body(QueueSubmitBody),
    responses=QUEUE.error_responses(400, 401, 402, 413, 415, 422, 429),
)
async def submit(
    model_id: str,
    name: str,
    request: Request,
    runtime: RuntimeDep,
    account: CurrentAccount,
    x_webhook_url: Annotated[
        str | None,
        Header(
            alias=WEBHOOK_URL_HEADER,
            description="HTTPS URL to POST status callbacks to (signed per Standard Webhooks)",
            json_schema_extra={"format": "uri", "pattern": "^https://", "maxLength": 2048},
        ),
    ] = None,
    x_webhook_mode: Annotated[
        str | None,
        Header(
            alias=WEBHOOK_MODE_HEADER,
            description="terminal (default): one callback at the final status; sync: progress "
            "callbacks too",
            json_schema_extra={"enum": list(outbox.MODES)},
        ),
    ] = None,
    x_webhook_previews: Annotated[
        str | None,
        Header(
            alias=WEBHOOK_PREVIEWS_HEADER,
            description="With X-Webhook-Mode: sync, true adds `preview` (the images as they "
            "stand, small JPEG data URLs) to the progress callbacks (terminal mode has none, "
            "so there it changes nothing)",
            json_schema_extra={"enum": ["true", "false"]},
        ),
    ] = None,
    idempotency_key: idempotency.IdempotencyKeyHeader = None,
) -> Response:
    QUEUE.resolve_model(runtime.settings, model_id)
    data = await json_object(request)
    gen = QUEUE.build(runtime.settings, model_id, QUEUE.canonical(data))
    webhook = webhook_of(request, runtime)
    accepted, headers = await accept(
        request,
        runtime,
        account,
        gen,
        dialect=QUEUE,
        raw_fields=data,
        webhook=webhook,
        build_response=lambda job: accepted_body(runtime, job),
    )
    job = accepted.job
    body = accepted.response or accepted_body(runtime, job)
    return JSONResponse(
        body,
        status_code=202,
        headers={
            "x-remaining-credits": str(accepted.balance),
            "x-request-id": job.request_id,
            **headers,
        },
    )


@router.get(
    "/v2/requests/status/{request_id}",
    summary="Status of a request; webhooks POST the same object",
    response_model=StatusBody,
    responses=QUEUE.error_responses(401, 404),
)
async def status(request_id: str, runtime: RuntimeDep, account: CurrentAccount) -> Response:
    response = await results.status_response(runtime, account.id, request_id)
    assert response is not None  # answered whole unless `plain_only`
    return response
