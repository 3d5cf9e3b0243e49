"""The sync dialect (seed 000): `POST /v1/aura-flow` → the image itself.

Mapping only. The body arrives as multipart/form-data (the seed's own Node client), as
application/x-www-form-urlencoded or as JSON; form values are strings ("5", "false") and go to
`build_request` as they are, whose lax parsing turns numeric and boolean strings into numbers
and booleans, so no parameter rule lives here. What this module owns is the seed's *defaults*
(cfg 5, steps 25, uni_pc, webp, 1024², …), passed as explicit values when a field is absent,
and the response: one image as bytes, or JSON with base64 images for several (or `base64`).

The request runs through the same queue as everything else and waits for its job, woken by
the store's bus; past `sync_timeout_seconds` it answers 504 with the request_id, and the job
stays pollable on `/v2/requests/status/{request_id}`.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.datastructures import UploadFile

from auraserve.api import idempotency
from auraserve.api.auth import CurrentAccount
from auraserve.api.body import json_object
from auraserve.api.dialects.requests import wait_until_terminal
from auraserve.api.errors import use_dialect
from auraserve.api.openapi import ERRORS_QUEUE, error_responses
from auraserve.api.store_calls import call_store
from auraserve.api.submit import Accepted, accept, remaining_credits, runtime_of
from auraserve.config import Settings
from auraserve.core.jobs import Job, JobStatus
from auraserve.core.request import build_request
from auraserve.core.samplers import OUTPUT_FORMATS, SAMPLERS, SCHEDULERS
from auraserve.errors import AuraserveError, InvalidParameter
from auraserve.runtime import Runtime
from auraserve.store import ledger
from auraserve.store.keys import Account

DIALECT = "sync"
SEED_PATH = "/v1/aura-flow"

# Dialect field → canonical field.
FIELDS: dict[str, str] = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "cfg": "guidance_scale",
    "seed": "seed",
    "shift": "shift",
    "steps": "steps",
    "width": "width",
    "height": "height",
    "sampler": "sampler",
    "scheduler": "scheduler",
    "output_format": "output_format",
    "output_quality": "output_quality",
    "number_of_images": "num_images",
    # Extension beyond seed 000 (same name as seed 002):
    "expand_prompt": "expand_prompt",
}
CANONICAL_TO_DIALECT = {v: k for k, v in FIELDS.items()}

# Seed 000's documented defaults, in canonical names. `seed` is absent: random by default.
DEFAULTS: dict[str, Any] = {
    "guidance_scale": 5.0,
    "shift": 1.73,
    "steps": 25,
    "width": 1024,
    "height": 1024,
    "sampler": "uni_pc",
    "scheduler": "normal",
    "output_format": "webp",
    "output_quality": 80,
    "num_images": 1,
}
# On /v1/{preset} the preset's own size wins (that is what naming a 512 preset is for).
_PRESET_SIZED = ("width", "height")

_BOOL = TypeAdapter(bool)
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class SyncBody(BaseModel):
    """Documentation of the body (JSON or form fields); parsing goes through build_request."""

    prompt: str = Field(description="What to draw.", min_length=1, max_length=10_000)
    negative_prompt: str | None = Field(None, max_length=10_000)
    cfg: float | None = Field(None, ge=0, le=20, description="Guidance scale (default 5)")
    seed: int | None = Field(None, ge=0, le=2**53 - 1, description="Random when absent")
    shift: float | None = Field(None, ge=0, le=10, description="Default 1.73")
    steps: int | None = Field(None, ge=1, le=100, description="Default 25")
    width: int | None = Field(None, ge=512, le=2048, description="Default 1024")
    height: int | None = Field(None, ge=512, le=2048, description="Default 1024")
    sampler: str | None = Field(
        None, json_schema_extra={"enum": list(SAMPLERS)}, description="Default uni_pc"
    )
    scheduler: str | None = Field(
        None, json_schema_extra={"enum": list(SCHEDULERS)}, description="Default normal"
    )
    output_format: str | None = Field(
        None, json_schema_extra={"enum": list(OUTPUT_FORMATS)}, description="Default webp"
    )
    output_quality: int | None = Field(None, ge=0, le=100, description="Default 80")
    number_of_images: int | None = Field(None, ge=1, le=10, description="Default 1")
    base64: bool | None = Field(None, description="Answer JSON with base64 images (default false)")
    expand_prompt: bool | None = None


class SyncImages(BaseModel):
    images: list[str] = Field(description="Base64-encoded images")
    seeds: list[int]


class GenerationFailed(AuraserveError):
    """The job ended without an image (ERROR: engine failure; nothing charged)."""

    def __init__(self, status_code: int, title: str, message: str, extra: dict[str, Any]) -> None:
        self.status_code = status_code
        self.title = title
        self.extra = extra
        super().__init__(message)


class SyncTimeout(AuraserveError):
    status_code = 504
    title = "Gateway Timeout"

    def __init__(self, message: str, extra: dict[str, Any]) -> None:
        self.extra = extra
        super().__init__(message)


async def read_fields(request: Request) -> dict[str, Any]:
    """The body as a flat dict: form fields (strings) or a JSON object."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type in _FORM_TYPES:
        try:
            form = await request.form()
        except Exception as exc:  # malformed multipart: a client error, never a 500
            raise InvalidParameter(
                field="body", message=f"body: malformed form data ({exc})"
            ) from None
        data: dict[str, Any] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                raise InvalidParameter(field=name, message=f"{name}: files are not accepted")
            data[name] = value
        return data
    if content_type in ("application/json", "") or content_type.endswith("+json"):
        return await json_object(request)
    raise UnsupportedMediaType(content_type)


class UnsupportedMediaType(AuraserveError):
    status_code = 415
    title = "Unsupported Media Type"

    def __init__(self, content_type: str) -> None:
        super().__init__(
            f"Content-Type '{content_type[:100]}' is not accepted; send multipart/form-data, "
            "application/x-www-form-urlencoded or application/json"
        )


def parse_bool(name: str, value: Any) -> bool:
    try:
        return bool(_BOOL.validate_python(value))
    except ValidationError:
        raise InvalidParameter(
            field=name, message=f"{name}: must be a boolean (true/false/1/0)", allowed="a boolean"
        ) from None


def canonical_fields(data: Mapping[str, Any], *, named_preset: bool) -> dict[str, Any]:
    """Rename to canonical names; absent (or empty form) fields take seed 000's defaults."""
    fields: dict[str, Any] = {}
    for name, value in data.items():
        if name not in FIELDS:
            continue
        # An empty form field means "not given" (HTML forms send every input); prompts keep ""
        # so that an empty prompt is refused by name.
        if isinstance(value, str) and value == "" and name not in ("prompt", "negative_prompt"):
            continue
        fields[FIELDS[name]] = value
    for key, value in DEFAULTS.items():
        if named_preset and key in _PRESET_SIZED:
            continue
        fields.setdefault(key, value)
    return fields


def _route(model_id: str, named_preset: bool) -> Any:
    async def generate(
        request: Request,
        account: CurrentAccount,
        idempotency_key: idempotency.IdempotencyKeyHeader = None,
    ) -> Response:
        try:
            return await _generate(request, account, model_id, named_preset)
        except AuraserveError as exc:
            # Seed 000: every authenticated response says how many credits are left.
            extra = dict(getattr(exc, "headers", {}) or {})
            extra.setdefault("x-remaining-credits", await remaining_credits(request, account))
            exc.headers = extra  # type: ignore[attr-defined]
            raise

    return generate


async def _generate(
    request: Request, account: Account, model_id: str, named_preset: bool
) -> Response:
    runtime = runtime_of(request)
    data = await read_fields(request)
    as_base64 = (
        parse_bool("base64", data["base64"]) if data.get("base64") not in (None, "") else False
    )
    gen = build_request(
        canonical_fields(data, named_preset=named_preset),
        model=model_id,
        preset=runtime.settings.presets[model_id],
        names=CANONICAL_TO_DIALECT,
    )
    accepted = await accept(request, account, gen, dialect=DIALECT, raw_fields=data)
    job = await finished_job(request, runtime, accepted)
    return await image_response(request, runtime, account, job, as_base64, accepted.headers)


async def finished_job(request: Request, runtime: Runtime, accepted: Accepted) -> Job:
    """Wait for the job; raise the dialect's error for anything but COMPLETED."""
    job = accepted.job
    done = await wait_until_terminal(request, runtime, job, runtime.settings.sync_timeout_seconds)
    base = runtime.settings.resolved_public_url
    ids = {
        "request_id": job.request_id,
        "polling_url": f"{base}/v2/requests/status/{job.request_id}",
    }
    headers = {"x-request-id": job.request_id}
    if done is None:
        timeout = SyncTimeout(
            f"The image is not ready after {runtime.settings.sync_timeout_seconds:g} s; it is "
            f"still being generated: poll {ids['polling_url']}",
            ids,
        )
        timeout.headers = headers  # type: ignore[attr-defined]
        raise timeout
    if done.status == JobStatus.COMPLETED:
        return done
    if done.status == JobStatus.CANCELLED:
        exc: AuraserveError = GenerationFailed(
            409, "Cancelled", "The request was cancelled (not charged)", ids
        )
    elif done.status == JobStatus.FAILED:
        exc = GenerationFailed(400, "Generation failed", f"{done.error} (not charged)", ids)
    else:
        exc = GenerationFailed(
            500,
            "Server Error",
            f"Server had some issue with processing: {done.error} (not charged)",
            ids,
        )
    exc.headers = headers  # type: ignore[attr-defined]
    raise exc


def read_images(runtime: Runtime, job: Job) -> list[bytes]:
    assert job.output is not None
    images = []
    for name in job.output["media"]:
        path = runtime.media.path(name)
        if path is None:
            raise GenerationFailed(
                500, "Server Error", "The stored image is missing", {"request_id": job.request_id}
            )
        images.append(path.read_bytes())
    return images


async def image_response(
    request: Request,
    runtime: Runtime,
    account: Account,
    job: Job,
    as_base64: bool,
    extra_headers: Mapping[str, str],
) -> Response:
    images = await call_store(runtime, read_images, runtime, job)
    seeds = list(job.output.get("seeds") or job.request.seeds) if job.output else job.request.seeds
    balance = await call_store(runtime, ledger.balance, runtime.db, account.id)
    headers = {
        "x-remaining-credits": str(balance),
        "x-request-id": job.request_id,
        "x-seed": str(seeds[0]),
        "x-generation-time": f"{job.engine_seconds or 0.0:.3f}",
        **extra_headers,
    }
    if len(images) == 1 and not as_base64:
        return Response(images[0], media_type=job.request.media_type, headers=headers)
    body = {"images": [base64.b64encode(i).decode("ascii") for i in images], "seeds": seeds}
    return JSONResponse(body, headers=headers)


def _form_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The JSON body's schema without nulls: a form field is either sent or not."""
    properties = {}
    for name, prop in schema["properties"].items():
        options = [o for o in prop.get("anyOf", []) if o.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
            prop = {**options[0], **rest}
        properties[name] = prop
    return {**schema, "properties": properties}


def _body_schema() -> dict[str, Any]:
    schema = SyncBody.model_json_schema()
    form = _form_schema(schema)
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": form},
            "application/x-www-form-urlencoded": {"schema": form},
            "application/json": {"schema": schema},
        },
    }


def _responses() -> dict[int | str, dict[str, Any]]:
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        200: {
            "description": "One image (its bytes), or JSON with base64 images when several "
            "were asked for or base64=true. Headers: x-remaining-credits, x-request-id, x-seed, "
            "x-generation-time.",
            "content": {
                "image/webp": binary,
                "image/png": binary,
                "image/jpeg": binary,
                "application/json": {"schema": SyncImages.model_json_schema()},
            },
        },
        **error_responses(ERRORS_QUEUE, 400, 401, 406, 409, 413, 415, 422, 429, 500, 504),
    }


def build_router(settings: Settings) -> APIRouter:
    """`POST /v1/aura-flow` (the default preset, seed 000's path) and `POST /v1/{preset}`
    for every configured preset. Explicit routes, so an unknown path is 404 and a known path
    with another method is 405 with Allow."""
    router = APIRouter(tags=["sync (seed 000)"], dependencies=[Depends(use_dialect(DIALECT))])
    paths = [(SEED_PATH, settings.default_preset, False)]
    # "images" would shadow nothing today but is OpenAI's namespace; "aura-flow" is the seed's.
    reserved = ("images", "aura-flow")
    paths += [(f"/v1/{p}", p, True) for p in settings.presets if p not in reserved]
    for path, preset, named in paths:
        router.add_api_route(
            path,
            _route(preset, named),
            methods=["POST"],
            name=f"sync_{preset}" if named else "sync_aura_flow",
            operation_id=f"sync_generate_{preset}" if named else "sync_generate_aura_flow",
            summary=f"Generate and return the image ({preset})",
            response_class=Response,
            responses=_responses(),
            openapi_extra={"requestBody": _body_schema()},
        )
    return router
