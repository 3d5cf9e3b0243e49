"""OpenAI Images: `POST /v1/images/generations`, so the `openai` SDKs work with
only `base_url` changed.

Mapping only: `n` → num_images, `size` "WxH" → width/height ("auto": the preset's), `quality`
→ steps, `output_compression` → output_quality; `model` names a preset (OpenAI's own model
names mean the default preset, so existing code keeps its `model=`). Ranges and rules stay in
`core.request`. Errors come out in OpenAI's shape `{"error": {message, type, param, code}}`,
which the SDKs raise as typed exceptions; an exhausted balance is OpenAI's 429
`insufficient_quota`. Every path under `/v1/` that no route serves (and every method a route
there does not take) answers in its shape too (`api.errors.install`'s prefixes), as the SDKs
expect of anything below their `base_url`.

`GET /v1/models` and `GET /v1/models/{id}` list the served model ids (the presets) as OpenAI's
model objects, so `client.models.list()` works; retrieving one of OpenAI's own model names
answers too, since image requests accept them as the default preset.

As OpenAI's API does, `gpt-image-*` models answer with `b64_json` unless told otherwise;
`dall-e-*`, our presets and an absent model answer with `url`.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from auraserve.api import idempotency, results
from auraserve.api.body import json_object
from auraserve.api.deps import CurrentAccount, RuntimeDep, use_dialect
from auraserve.api.dialect import Dialect, DialectName, Problem
from auraserve.api.openapi import (
    MODEL_NAMES_MARK,
    OPENAI_TAG,
    OpenAIErrorBody,
    int_range_pattern,
    json_request_body,
    request_body_model,
)
from auraserve.api.submit import accept
from auraserve.core.request import bounds
from auraserve.errors import AuraserveError, InsufficientBalance, InvalidParameter, ModelNotFound

PREFIX = "/v1/"  # everything below it answers in this dialect's shape
PATH = "/v1/images/generations"
MODELS_PATH = "/v1/models"
OWNER = "auraserve"
# A model object's `created`: when this process started (presets come from its settings).
_STARTED = int(time.time())

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
RESPONSE_FORMATS = ("url", "b64_json")
# The sizes OpenAI's models offer, named in errors and the document as examples; any
# WIDTHxHEIGHT within the canonical range is accepted.
COMMON_SIZES = ("1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792", "512x512")
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$", re.ASCII)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class OpenAIDialect(Dialect):
    name = DialectName.OPENAI
    fields: ClassVar[dict[str, str]] = {
        "prompt": "prompt",
        "n": "num_images",
        "output_format": "output_format",
        "output_compression": "output_quality",
        # Extensions (the SDKs pass them with extra_body=…):
        "negative_prompt": "negative_prompt",
        "seed": "seed",
        "guidance_scale": "guidance_scale",
    }
    derived: ClassVar[dict[str, str]] = {"width": "size", "height": "size", "steps": "quality"}
    # OpenAI's default is png whatever our preset says.
    defaults: ClassVar[dict[str, Any]] = {"output_format": "png"}
    # OpenAI's own model names: clients that keep `model=` get the default preset.
    model_aliases = frozenset(
        {"dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2"}
    )
    model_field = "model"
    error_model = OpenAIErrorBody

    def status_of(self, exc: AuraserveError) -> int:
        # OpenAI reports exhausted quota as 429 insufficient_quota, an unknown model in a
        # path (GET /v1/models/{id}) as 404 model_not_found.
        if isinstance(exc, InsufficientBalance):
            return 429
        return 404 if isinstance(exc, ModelNotFound) else exc.status

    def error_body(self, problem: Problem) -> dict[str, Any]:
        insufficient = isinstance(problem.error, InsufficientBalance)
        code = "insufficient_quota" if insufficient else None
        if isinstance(problem.error, ModelNotFound):
            code = "model_not_found"
        # Another status's type: a server's failure is never the request's fault.
        fallback = "server_error" if problem.status >= 500 else "invalid_request_error"
        return {
            "error": {
                "message": problem.message,
                "type": code if insufficient else _TYPES.get(problem.status, fallback),
                "param": "model" if code == "model_not_found" else problem.field,
                "code": code,
            }
        }

    def canonical(self, data: Mapping[str, Any]) -> dict[str, Any]:
        fields = super().canonical(data)
        fields.update(parse_size(data.get("size")))
        fields.update(parse_quality(data.get("quality")))
        return fields


OPENAI = OpenAIDialect()


def _size_rule() -> str:
    low, high = bounds("width")
    return (
        f"'WIDTHxHEIGHT' with width and height from {low} to {high} (e.g. "
        + ", ".join(COMMON_SIZES)
        + ") or 'auto'"
    )


def _size_pattern() -> str:
    """`parse_size`'s rule as a pattern: `auto`, or two sides in range with the separators,
    spaces and leading zeros (five digits at most) that `_SIZE` lets through."""
    low, high = bounds("width")
    sides = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        start, end = max(low, 10 ** (digits - 1)), min(high, 10**digits - 1)
        if start <= end:
            sides.append(f"0{{0,{5 - digits}}}{int_range_pattern(start, end)}")
    side = "(?:" + "|".join(sides) + ")"
    # (?!\n): Python's `$` also matches before a final newline, which "auto" refuses.
    return rf"^(?:auto(?!\n)|\s*{side}\s*[xX×]\s*{side}\s*)$"


def parse_size(value: Any) -> dict[str, Any]:
    if value is None or value == "auto":
        return {}
    match = _SIZE.match(value) if isinstance(value, str) else None
    width, height = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    low, high = bounds("width")
    if match is None or not all(low <= side <= high for side in (width, height)):
        shown = str(value)[:40]
        raise InvalidParameter(
            field="size",
            message=f"size: '{shown}' is not a supported size; allowed: {_size_rule()}",
            allowed=_size_rule(),
        )
    return {"width": width, "height": height}


def parse_quality(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, str) or value not in QUALITY_STEPS:
        raise InvalidParameter(
            field="quality", message="quality: must be one of: " + ", ".join(QUALITY_STEPS)
        )
    steps = QUALITY_STEPS[value]
    return {} if steps is None else {"steps": steps}


ImageGenerationBody = request_body_model(
    "ImageGenerationBody",
    OPENAI.fields,
    doc="Documentation of the body; parsing goes through `core.request.build_request`.",
    defaults=OPENAI.defaults,
    own={
        "model": (
            str | None,
            Field(
                None,
                description="A preset id; OpenAI model names and absence mean the default preset",
                # api.openapi.tidy_document lists the configured presets and these aliases here.
                json_schema_extra={MODEL_NAMES_MARK: [*sorted(OpenAIDialect.model_aliases)]},
            ),
        ),
        "size": (
            str | None,
            Field(
                None,
                description=f"{_size_rule()}; default: the preset's size",
                # Not `pattern=`: pydantic's regex engine has no look-ahead (doc-only model).
                json_schema_extra={"pattern": _size_pattern()},
                examples=list(COMMON_SIZES),
            ),
        ),
        "quality": (
            str | None,
            Field(
                None,
                json_schema_extra={"enum": list(QUALITY_STEPS)},
                description="Steps: low 12, medium/standard 25, high/hd 40, xhigh 50, max 60; "
                "auto = the preset's default",
            ),
        ),
        "response_format": (
            str | None,
            Field(
                None,
                json_schema_extra={"enum": list(RESPONSE_FORMATS)},
                description="Default: b64_json for gpt-image-* models, url otherwise",
            ),
        ),
        "user": (str | None, None),
    },
)


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


class ModelObject(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelObject]


router = APIRouter(tags=[OPENAI_TAG], dependencies=[use_dialect(OPENAI)])


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _STARTED, "owned_by": OWNER}


@router.get(
    MODELS_PATH,
    summary="List the models (OpenAI Models API): the served presets",
    response_model=ModelList,
    responses=OPENAI.error_responses(401),
)
async def list_models(runtime: RuntimeDep, account: CurrentAccount) -> Response:
    data = [_model_object(name) for name in sorted(runtime.settings.presets)]
    return JSONResponse({"object": "list", "data": data})


@router.get(
    MODELS_PATH + "/{model}",
    summary="Retrieve a model (OpenAI Models API)",
    response_model=ModelObject,
    responses=OPENAI.error_responses(401, 404),
)
async def retrieve_model(model: str, runtime: RuntimeDep, account: CurrentAccount) -> Response:
    if model not in runtime.settings.presets and model not in OPENAI.model_aliases:
        raise ModelNotFound(model)
    return JSONResponse(_model_object(model))


@router.post(
    PATH,
    summary="Create images (OpenAI Images API)",
    response_model=ImagesResponse,
    openapi_extra=json_request_body(ImageGenerationBody),
    responses=OPENAI.error_responses(400, 401, 409, 413, 415, 422, 429, 500, 504),
)
async def generations(
    request: Request,
    runtime: RuntimeDep,
    account: CurrentAccount,
    idempotency_key: idempotency.IdempotencyKeyHeader = None,
) -> Response:
    data = await json_object(request)
    if data.get("stream"):
        raise InvalidParameter(
            field="stream", message="stream: streaming image generation is not supported"
        )
    if data.get("background") == "transparent":
        raise InvalidParameter(
            field="background", message="background: transparent backgrounds are not supported"
        )
    # gpt-image models only ever answer with base64 at OpenAI: clients written for them read
    # `b64_json` without asking for it.
    gpt_image = str(data.get("model")).startswith("gpt-image-")
    response_format = data.get("response_format") or ("b64_json" if gpt_image else "url")
    if response_format not in RESPONSE_FORMATS:
        raise InvalidParameter(
            field="response_format",
            message="response_format: must be one of: " + ", ".join(RESPONSE_FORMATS),
        )
    model_id = OPENAI.resolve_model(runtime.settings, data.get("model"))
    gen = OPENAI.build(runtime.settings, model_id, OPENAI.canonical(data))
    accepted, headers = await accept(
        request, runtime, account, gen, dialect=OPENAI, raw_fields=data
    )
    job = await results.finished_job(request, runtime, accepted.job)
    assert job.output is not None
    revised = job.output.get("prompt_used") or gen.prompt
    if response_format == "url":
        items: list[dict[str, Any]] = [
            {"url": runtime.media.url(name), "revised_prompt": revised}
            for name in job.output["media"]
        ]
    else:
        images = await runtime.db.call(results.read_images, runtime, job)
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
    headers = await results.finished_headers(runtime, account.id, job, headers)
    return JSONResponse(body, headers=headers)
