"""The Sync API: `POST /v1/aura-flow` → the image itself, as the hosted AuraFlow sync API answers.

Mapping only. The body arrives as multipart/form-data (the hosted API's own Node client), as
application/x-www-form-urlencoded or as JSON; form values are strings ("5", "false") and go to
`build_request` as they are, whose lax parsing turns numeric and boolean strings into numbers
and booleans, so no parameter rule lives here. What this module owns is the API's *defaults*
(cfg 5, steps 25, uni_pc, webp, 1024², …), passed as explicit values when a field is absent,
and the response: one image as bytes, or JSON with base64 images for several (or `base64`).

The request runs through the same queue as everything else and waits for its job, woken by
the store's bus; past `sync_timeout_seconds` it answers 504 with the request_id, and the job
stays pollable on `/v2/requests/status/{request_id}`.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Mapping
from typing import Any, ClassVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.datastructures import UploadFile

from auraserve.api import idempotency, results
from auraserve.api.body import FORM_TYPES, JSON, media_type, read_json_body, read_numbers
from auraserve.api.deps import CurrentAccount, RuntimeDep, use_dialect
from auraserve.api.dialect import Dialect, DialectName
from auraserve.api.image_field import upload_as_field
from auraserve.api.openapi import SYNC_TAG, image_content, not_null, request_body_model
from auraserve.api.submit import accept, remaining_credits
from auraserve.config import Settings
from auraserve.core.jobs import Job
from auraserve.core.request import map_fields
from auraserve.errors import (
    AuraserveError,
    InsufficientBalance,
    InvalidParameter,
    StoreUnavailable,
)
from auraserve.runtime import Runtime
from auraserve.store.keys import Account

SEED_PATH = "/v1/aura-flow"
_BOOL = TypeAdapter(bool)
# On /v1/{preset} the preset's own size wins (that is what naming a 512 preset is for).
_PRESET_SIZED = ("width", "height")


class SyncDialect(Dialect):
    name = DialectName.SYNC
    fields: ClassVar[dict[str, str]] = {
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
        # Extensions beyond the hosted Sync API (same names as in the Queue API):
        "expand_prompt": "expand_prompt",
        "exact": "exact",
        "loras": "loras",
        "image": "image",
        "strength": "strength",
    }
    # The hosted Sync API's documented defaults, canonical names. `seed` is absent: random.
    defaults: ClassVar[dict[str, Any]] = {
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

    def status_of(self, exc: AuraserveError) -> int:
        # The Sync API answers 406 where the Queue API answers 402 for the same condition.
        return 406 if isinstance(exc, InsufficientBalance) else exc.status

    def canonical(self, data: Mapping[str, Any]) -> dict[str, Any]:
        # An empty form field means "not given" (HTML forms send every input); prompts keep ""
        # so that an empty prompt is refused by name.
        given = {
            name: value
            for name, value in data.items()
            if not (value == "" and name not in ("prompt", "negative_prompt"))
        }
        return map_fields(given, self.fields)

    def defaults_for(self, *, named_preset: bool) -> dict[str, Any]:
        if not named_preset:
            return dict(self.defaults)
        return {k: v for k, v in self.defaults.items() if k not in _PRESET_SIZED}


SYNC = SyncDialect()

SyncBody = request_body_model(
    "SyncBody",
    SYNC.fields,
    doc="Documentation of the body (JSON or form fields); parsing goes through build_request.",
    defaults=SYNC.defaults,
    own={
        "base64": (
            bool | None,
            Field(None, description="Answer JSON with base64 images (default false)"),
        )
    },
)


class SyncImages(BaseModel):
    images: list[str] = Field(description="Base64-encoded images")
    seeds: list[int]


async def read_fields(request: Request) -> dict[str, Any]:
    """The body as a flat dict: form fields (strings) or a JSON object."""
    content_type = media_type(request, (*FORM_TYPES, JSON))
    if content_type in FORM_TYPES:
        try:
            form = await request.form()
        except Exception as exc:  # malformed multipart: a client error, never a 500
            raise InvalidParameter(
                field="body", message=f"body: malformed form data ({exc})"
            ) from None
        data: dict[str, Any] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "image":
                    raise InvalidParameter(field=name, message=f"{name}: files are not accepted")
                data[name] = await upload_as_field(value)  # checked as an inline image
                continue
            data[name] = value
        return read_numbers(data, SYNC)
    return await read_json_body(request)


def parse_bool(name: str, value: Any) -> bool:
    try:
        return bool(_BOOL.validate_python(value))
    except ValidationError:
        raise InvalidParameter(
            field=name, message=f"{name}: must be a boolean (true/false/1/0)", allowed="a boolean"
        ) from None


def _route(model_id: str, named_preset: bool) -> Any:
    async def generate(
        request: Request,
        runtime: RuntimeDep,
        account: CurrentAccount,
        idempotency_key: idempotency.IdempotencyKeyHeader = None,
    ) -> Response:
        try:
            return await _generate(request, runtime, account, model_id, named_preset)
        except AuraserveError as exc:
            # The Sync API: every authenticated response says how many credits are left, when
            # the store can say (a failed read must not replace the error being answered).
            with contextlib.suppress(StoreUnavailable):
                if "x-remaining-credits" not in exc.headers:
                    exc.headers["x-remaining-credits"] = await remaining_credits(runtime, account)
            raise

    return generate


async def _generate(
    request: Request, runtime: Runtime, account: Account, model_id: str, named_preset: bool
) -> Response:
    data = await read_fields(request)
    as_base64 = (
        parse_bool("base64", data["base64"]) if data.get("base64") not in (None, "") else False
    )
    gen = SYNC.build(
        runtime.settings,
        model_id,
        SYNC.canonical(data),
        defaults=SYNC.defaults_for(named_preset=named_preset),
    )
    accepted, headers = await accept(request, runtime, account, gen, dialect=SYNC, raw_fields=data)
    job = await results.finished_job(request, runtime, accepted.job)
    return await image_response(request, runtime, account, job, as_base64, headers)


async def image_response(
    request: Request,
    runtime: Runtime,
    account: Account,
    job: Job,
    as_base64: bool,
    extra_headers: Mapping[str, str],
) -> Response:
    images = await runtime.db.call(results.read_images, runtime, job)
    seeds = list(job.output.get("seeds") or job.request.seeds) if job.output else job.request.seeds
    headers = await results.finished_headers(
        runtime,
        account.id,
        job,
        {
            "x-seed": str(seeds[0]),
            "x-generation-time": f"{job.engine_seconds or 0.0:.3f}",
            **extra_headers,
        },
    )
    if len(images) == 1 and not as_base64:
        return Response(images[0], media_type=job.request.media_type, headers=headers)
    body = {"images": [base64.b64encode(i).decode("ascii") for i in images], "seeds": seeds}
    return JSONResponse(body, headers=headers)


def _form_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The JSON body's schema without nulls: a form field is either sent or not. Fields that
    hold a list or an object have no form spelling and are documented for JSON bodies only."""
    properties = {}
    for name, prop in schema["properties"].items():
        prop = not_null(prop)
        if prop.get("type") in ("array", "object"):
            continue
        properties[name] = prop
    return {**schema, "properties": properties}


def _body_schema() -> dict[str, Any]:
    schema = SyncBody.model_json_schema()
    form = _form_schema(schema)
    # In form-data, `image` may also be a file part (read as inline base64 by read_fields).
    image = form["properties"].get("image", {})
    multipart = {
        **form,
        "properties": {
            **form["properties"],
            "image": {
                **{k: v for k, v in image.items() if k != "type"},
                "anyOf": [{"type": "string"}, {"type": "string", "format": "binary"}],
            },
        },
    }
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": multipart},
            "application/x-www-form-urlencoded": {"schema": form},
            "application/json": {"schema": schema},
        },
    }


def _responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "One image (its bytes), or JSON with base64 images when several "
            "were asked for or base64=true. Headers: x-remaining-credits, x-request-id, x-seed, "
            "x-generation-time.",
            "content": {
                **image_content(),
                "application/json": {"schema": SyncImages.model_json_schema()},
            },
        },
        **SYNC.error_responses(400, 401, 406, 409, 413, 415, 422, 429, 500, 504),
    }


def build_router(settings: Settings) -> APIRouter:
    """`POST /v1/aura-flow` (the default preset, the hosted API's path) and `POST /v1/{preset}`
    for every configured preset. Explicit routes, so an unknown path is 404 and a known path
    with another method is 405 with Allow."""
    router = APIRouter(tags=[SYNC_TAG], dependencies=[use_dialect(SYNC)])
    paths = [(SEED_PATH, settings.default_preset, False)]
    # "images" would shadow nothing today but is OpenAI's namespace; "aura-flow" is the default.
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
