"""The OpenAI Images dialect: `POST /v1/images/generations`, so the `openai` SDKs work with
only `base_url` changed.

Mapping only: `n` → num_images, `size` "WxH" → width/height ("auto": the preset's), `quality`
→ steps, `output_compression` → output_quality; `model` names a preset (OpenAI's own model
names mean the default preset, so existing code keeps its `model=`). Ranges and rules stay in
`core.request`; errors come out in OpenAI's shape `{"error": {message, type, param, code}}`
(api/errors.py renders it for this router's dialect), which the SDKs raise as typed exceptions.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from auraserve.api import idempotency
from auraserve.api.auth import CurrentAccount
from auraserve.api.body import json_object
from auraserve.api.dialects.sync import finished_job, read_images
from auraserve.api.errors import use_dialect
from auraserve.api.openapi import ERRORS_OPENAI, error_responses
from auraserve.api.store_calls import call_store
from auraserve.api.submit import accept, runtime_of
from auraserve.core.request import build_request
from auraserve.core.status import media_url
from auraserve.errors import InvalidParameter
from auraserve.runtime import Runtime
from auraserve.store import ledger

DIALECT = "openai"
PATH = "/v1/images/generations"

# Dialect field → canonical field (fields that map one to one).
FIELDS: dict[str, str] = {
    "prompt": "prompt",
    "n": "num_images",
    "output_format": "output_format",
    "output_compression": "output_quality",
    # Extensions (the SDKs pass them with extra_body=…):
    "negative_prompt": "negative_prompt",
    "seed": "seed",
    "guidance_scale": "guidance_scale",
}
CANONICAL_TO_DIALECT = {v: k for k, v in FIELDS.items()} | {
    "width": "size",
    "height": "size",
    "steps": "quality",
}

# quality → denoising steps. "auto" (or absent) keeps the preset's default; "standard"/"hd"
# are DALL·E 3's names for medium/high.
QUALITY_STEPS: dict[str, int | None] = {
    "auto": None,
    "low": 12,
    "medium": 25,
    "standard": 25,
    "high": 40,
    "hd": 40,
    "xhigh": 50,
    "max": 60,
}
# OpenAI's own model names: clients that keep `model=` get the default preset.
OPENAI_MODELS = frozenset(
    {"dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2"}
)
RESPONSE_FORMATS = ("url", "b64_json")
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")


class ImageGenerationBody(BaseModel):
    """Documentation of the body; parsing goes through `core.request.build_request`."""

    prompt: str = Field(min_length=1, max_length=10_000)
    model: str | None = Field(
        None, description="A preset id; OpenAI model names and absence mean the default preset"
    )
    n: int | None = Field(None, ge=1, le=10)
    size: str | None = Field(
        None,
        description='"WIDTHxHEIGHT" (512–2048 each) or "auto"',
        pattern=r"^(auto|\d{3,4}x\d{3,4})$",
    )
    quality: str | None = Field(
        None,
        json_schema_extra={"enum": list(QUALITY_STEPS)},
        description="Steps: low 12, medium/standard 25, high/hd 40, xhigh 50, max 60; "
        "auto = the preset's default",
    )
    response_format: str | None = Field(
        None, json_schema_extra={"enum": list(RESPONSE_FORMATS)}, description="Default url"
    )
    output_format: str | None = Field(
        None, json_schema_extra={"enum": ["png", "jpeg", "webp"]}, description="Default png"
    )
    output_compression: int | None = Field(None, ge=0, le=100)
    user: str | None = None
    negative_prompt: str | None = Field(None, max_length=10_000)
    seed: int | None = Field(None, ge=0, le=2**53 - 1)
    guidance_scale: float | None = Field(None, ge=0, le=20)


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    quality: str | None = None


router = APIRouter(tags=["OpenAI images"], dependencies=[Depends(use_dialect(DIALECT))])


def _invalid(param: str, message: str) -> InvalidParameter:
    return InvalidParameter(field=param, message=message)


def resolve_model(runtime: Runtime, value: Any) -> str:
    settings = runtime.settings
    if value is None or (isinstance(value, str) and value in OPENAI_MODELS):
        return settings.default_preset
    if isinstance(value, str) and value in settings.presets:
        return value
    raise _invalid(
        "model",
        f"The model '{str(value)[:100]}' does not exist; use one of: "
        + ", ".join(sorted(settings.presets)),
    )


def parse_size(value: Any) -> dict[str, Any]:
    if value is None or value == "auto":
        return {}
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise _invalid("size", "size: must be 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto'")
    return {"width": int(match.group(1)), "height": int(match.group(2))}


def parse_quality(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, str) or value not in QUALITY_STEPS:
        raise _invalid("quality", "quality: must be one of: " + ", ".join(QUALITY_STEPS))
    steps = QUALITY_STEPS[value]
    return {} if steps is None else {"steps": steps}


def canonical_fields(data: dict[str, Any]) -> dict[str, Any]:
    fields = {FIELDS[k]: v for k, v in data.items() if k in FIELDS}
    fields.update(parse_size(data.get("size")))
    fields.update(parse_quality(data.get("quality")))
    # OpenAI's default is png whatever our preset says.
    fields.setdefault("output_format", "png")
    return fields


@router.post(
    PATH,
    summary="Create images (OpenAI Images API)",
    response_model=ImagesResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ImageGenerationBody.model_json_schema()}},
        }
    },
    responses=error_responses(ERRORS_OPENAI, 400, 401, 409, 413, 422, 429, 500, 504),
)
async def generations(
    request: Request,
    account: CurrentAccount,
    idempotency_key: idempotency.IdempotencyKeyHeader = None,
) -> Response:
    runtime = runtime_of(request)
    data = await json_object(request)
    if data.get("stream"):
        raise _invalid("stream", "stream: streaming image generation is not supported")
    if data.get("background") == "transparent":
        raise _invalid("background", "background: transparent backgrounds are not supported")
    response_format = data.get("response_format") or "url"
    if response_format not in RESPONSE_FORMATS:
        raise _invalid("response_format", "response_format: must be one of: url, b64_json")
    model_id = resolve_model(runtime, data.get("model"))
    gen = build_request(
        canonical_fields(data),
        model=model_id,
        preset=runtime.settings.presets[model_id],
        names=CANONICAL_TO_DIALECT,
    )
    accepted = await accept(request, account, gen, dialect=DIALECT, raw_fields=data)
    job = await finished_job(request, runtime, accepted)
    assert job.output is not None
    base = runtime.settings.resolved_public_url
    revised = job.output.get("prompt_used") or gen.prompt
    if response_format == "url":
        items: list[dict[str, Any]] = [
            {"url": media_url(base, name), "revised_prompt": revised}
            for name in job.output["media"]
        ]
    else:
        images = await call_store(runtime, read_images, runtime, job)
        items = [
            {"b64_json": base64.b64encode(i).decode("ascii"), "revised_prompt": revised}
            for i in images
        ]
    body = {
        "created": int(job.completed_at or time.time()),
        "data": items,
        "output_format": job.request.output_format,
        "size": f"{job.output.get('width', gen.width)}x{job.output.get('height', gen.height)}",
    }
    if data.get("quality") is not None:
        body["quality"] = data["quality"]
    balance = await call_store(runtime, ledger.balance, runtime.db, account.id)
    return JSONResponse(
        body,
        headers={
            "x-request-id": job.request_id,
            "x-remaining-credits": str(balance),
            **accepted.headers,
        },
    )
