"""The async queue dialect (seed 002): submit → 202 → poll `/v2/requests/status/{id}`.

Mapping only: field names in, status objects out. Every rule lives in `core.request`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from auraserve.api.auth import CurrentAccount
from auraserve.api.body import json_object
from auraserve.core.jobs import split_request_id
from auraserve.core.request import GenerationRequest, build_request
from auraserve.core.status import status_body
from auraserve.errors import ModelNotFound, RequestNotFound
from auraserve.runtime import Runtime
from auraserve.store import jobs

router = APIRouter(tags=["async queue (seed 002)"])

# Dialect field → canonical field. Fields not listed are ignored, as the hosted API does.
FIELDS: dict[str, str] = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "num_images": "num_images",
    "guidance_scale": "guidance_scale",
    "num_inference_steps": "steps",
    "expand_prompt": "expand_prompt",
    "seed": "seed",
    "width": "width",
    "height": "height",
    # Extensions beyond seed 002 (same names as the sync dialect):
    "shift": "shift",
    "sampler": "sampler",
    "scheduler": "scheduler",
    "output_format": "output_format",
    "output_quality": "output_quality",
}
CANONICAL_TO_DIALECT = {v: k for k, v in FIELDS.items()}


class QueueSubmitBody(BaseModel):
    """Documentation of the body; parsing goes through `core.request.build_request`."""

    prompt: str = Field(description="What to draw.", max_length=10_000)
    num_images: int | None = Field(None, ge=1, le=10)
    guidance_scale: float | None = Field(None, ge=0, le=20)
    num_inference_steps: int | None = Field(None, ge=1, le=100)
    expand_prompt: bool | None = None
    negative_prompt: str | None = Field(None, max_length=10_000)
    seed: int | None = Field(None, ge=0, le=2**53 - 1)
    width: int | None = Field(None, ge=512, le=2048)
    height: int | None = Field(None, ge=512, le=2048)
    shift: float | None = Field(None, ge=0, le=10)
    sampler: str | None = None
    scheduler: str | None = None
    output_format: str | None = None
    output_quality: int | None = Field(None, ge=0, le=100)


class QueueSubmitResponse(BaseModel):
    request_id: str
    status: str
    polling_url: str


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def resolve_model(runtime: Runtime, model_id: str) -> str:
    if model_id not in runtime.settings.presets:
        raise ModelNotFound(model_id)
    return model_id


def map_fields(data: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    return {mapping[k]: v for k, v in data.items() if k in mapping}


def parse_submit(runtime: Runtime, model_id: str, data: dict[str, Any]) -> GenerationRequest:
    preset = runtime.settings.presets[model_id]
    return build_request(
        map_fields(data, FIELDS), model=model_id, preset=preset, names=CANONICAL_TO_DIALECT
    )


def enqueue(runtime: Runtime, account: Any, request: GenerationRequest) -> jobs.Submission:
    settings = runtime.settings
    preset = settings.presets[request.model]
    return jobs.submit(
        runtime.db,
        account_id=account.id,
        request=request,
        price=request.price(preset),
        max_queued=account.max_queued or settings.max_queued_per_account,
        max_attempts=settings.max_attempts,
    )


@router.post(
    "/{model_id}/v1/{name}-request",
    status_code=202,
    response_model=QueueSubmitResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": QueueSubmitBody.model_json_schema()}},
        }
    },
    responses={400: {}, 401: {}, 402: {}, 429: {}},
)
async def submit(model_id: str, name: str, request: Request, account: CurrentAccount) -> Response:
    runtime = runtime_of(request)
    resolve_model(runtime, model_id)
    data = await json_object(request)
    gen = parse_submit(runtime, model_id, data)
    submission = await run_in_threadpool(enqueue, runtime, account, gen)
    job = submission.job
    base = runtime.settings.resolved_public_url
    return JSONResponse(
        {
            "request_id": job.request_id,
            "status": job.status.value,
            "polling_url": f"{base}/v2/requests/status/{job.request_id}",
        },
        status_code=202,
        headers={"x-remaining-credits": str(submission.balance), "x-request-id": job.request_id},
    )


def load_job(runtime: Runtime, account_id: str, request_id: str) -> jobs.Job:
    parts = split_request_id(request_id)
    job = jobs.get(runtime.db, parts[1], account_id=account_id) if parts else None
    # Another account's id looks exactly like a missing one: 404, never 403.
    if job is None or parts is None or job.model_id != parts[0]:
        raise RequestNotFound(f"Request '{request_id[:200]}' not found")
    return job


@router.get("/v2/requests/status/{request_id}", responses={401: {}, 404: {}})
async def status(request_id: str, request: Request, account: CurrentAccount) -> dict[str, Any]:
    runtime = runtime_of(request)
    job = await run_in_threadpool(load_job, runtime, account.id, request_id)
    return status_body(job, runtime.settings.resolved_public_url)
