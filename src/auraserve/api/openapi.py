"""Response models for the OpenAPI document. Routes build their bodies by hand (the status
object comes from `core.status`), so these models only *describe* them; a Schemathesis run in
the test suite checks that every response matches what is declared here."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, create_model
from pydantic.config import JsonDict

from auraserve.core.request import GenerationRequest
from auraserve.core.samplers import MEDIA_TYPES
from auraserve.core.status import iso

# The document's tags: the names users know the three APIs by, in docs, logs and errors alike.
QUEUE_TAG = "Queue API"
SYNC_TAG = "Sync API"
OPENAI_TAG = "OpenAI Images"
REQUESTS_TAG = "Requests"
TAGS: list[dict[str, str]] = [
    {
        "name": QUEUE_TAG,
        "description": "Submit a generation request (202 with a request_id), then poll its "
        "status or receive it by webhook.",
    },
    {
        "name": SYNC_TAG,
        "description": "One call that waits for the image and answers with it (form data or "
        "JSON in, image bytes or base64 JSON out).",
    },
    {
        "name": OPENAI_TAG,
        "description": "OpenAI's Images and Models API: the openai SDKs work with only "
        "base_url changed.",
    },
    {
        "name": REQUESTS_TAG,
        "description": "Cancel a request or stream its status, whichever API submitted it.",
    },
]


IsoTime = Annotated[float | None, PlainSerializer(iso, return_type=str | None)]
"""A UNIX time, shown as ISO 8601 (`core.status.iso`): a body model with such fields can be
built from the store's rows (`model_validate(row, from_attributes=True)`)."""


class ErrorBody(BaseModel):
    """The Queue API's and Sync API's error shape."""

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
    resumed_from: int | None = Field(
        None,
        description="Present when this attempt continued from a step checkpoint (the step it "
        "resumed at) after its previous worker stopped, instead of starting over",
    )


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
    previews: bool | None = Field(
        None, description="Present (true) when progress callbacks carry `preview`"
    )


class Fidelity(BaseModel):
    """How a job's images were computed. Present on every job completed by this version."""

    exact: bool = Field(
        description="true: nothing lossy ran (the exact model, bit for bit as without speed "
        "modes on the same hardware); false: `lossy` names what did"
    )
    lossy: list[dict[str, Any]] | None = Field(
        None,
        description='One object per lossy option in force, with its settings: {"option": '
        '"step_cache", "method": "fbcache" | "taylorseer", "threshold", "warmup_steps", '
        '"max_skip", "skipped_calls", "transformer_calls"}, {"option": "fp8", "backend"}, '
        '{"option": "quantized_weights", "type"}. Absent when exact.',
    )


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
    fidelity: Fidelity | None = Field(
        None,
        description="How the images were computed (with the outputs); the same object is in "
        "each image's embedded metadata. Ask for exact output with `exact: true`.",
    )
    metrics: dict[str, Any] | None = None
    webhook: WebhookSection | None = Field(
        None, description="Callback attempts, when a webhook is set"
    )
    cancel_requested: bool | None = None
    note: str | None = Field(
        None,
        description="Something the client should know that is not an error: no live worker "
        "serves the model yet (QUEUED), or the outputs were deleted after the retention period "
        "(COMPLETED, output null)",
    )


_DESCRIPTIONS = {
    400: "Invalid parameter (the body names the field)",
    401: "Missing, invalid or revoked API key",
    402: "Insufficient balance",
    403: "The key is valid, but this operator route needs an admin account",
    404: "No such request, model or URL",
    406: "Not enough credits (the Sync API's status for it)",
    409: "The request already finished",
    413: "Request body too large",
    415: "Unsupported Content-Type",
    422: "Idempotency-Key reused with a different request",
    429: "Rate limit or jobs-in-flight limit reached (see Retry-After and RateLimit-*)",
    500: "The engine failed; nothing was charged",
    503: "Busy or the database is unreachable: retry after Retry-After (same Idempotency-Key)",
    504: "Still running after the sync timeout; poll the request_id",
}


IMAGE_TYPES = tuple(MEDIA_TYPES.values())
"""Every content type an image response can have."""


def image_content() -> dict[str, Any]:
    """OpenAPI `content` for a response that is one image's bytes."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return dict.fromkeys(IMAGE_TYPES, binary)


def event_stream_schema(event: type[BaseModel]) -> dict[str, Any]:
    """A `text/event-stream` body: text, not a JSON string. Each `data:` line carries one
    `event` object as JSON; OpenAPI 3.1 cannot describe events, so the object's schema rides
    along as `x-event-data` (OpenAPI 3.2 names the same idea `itemSchema`)."""
    return {
        "type": "string",
        "contentMediaType": "text/event-stream",
        "description": "`data: <JSON object>` blocks, separated by a blank line; "
        "`: keep-alive` comment lines in between",
        "x-event-data": {"$ref": f"#/components/schemas/{event.__name__}"},
    }


def media_responses(errors: Mapping[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """`GET /media/{name}`: the image itself, never JSON, with the headers it is served with."""
    return {
        200: {
            "description": "The image. Served without a key, cached for a year.",
            "content": image_content(),
            "headers": {
                "Cache-Control": {"schema": {"type": "string"}},
                "X-Content-Type-Options": {"schema": {"type": "string", "enum": ["nosniff"]}},
            },
        },
        **errors,
    }


def error_responses(model: type[BaseModel], *codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error `codes`, each with the dialect's error body `model`."""
    return {code: {"model": model, "description": _DESCRIPTIONS[code]} for code in codes}


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its JSON body itself, documented by `model`."""
    body = {"application/json": {"schema": model.model_json_schema()}}
    return {"requestBody": {"required": True, "content": body}}


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
        extra: JsonDict | None = (
            {"pattern": TEXT_PATTERNS[canonical]} if canonical in TEXT_PATTERNS else None
        )
        if canonical in required:
            definitions[public] = (
                annotation,
                Field(description=description or None, json_schema_extra=extra),
            )
        else:
            definitions[public] = (
                Optional[annotation],  # noqa: UP045 (the annotation is a runtime value)
                Field(None, description=description or None, json_schema_extra=extra),
            )
    definitions.update(own or {})
    model: type[BaseModel] = create_model(name, __doc__=doc, **definitions)
    return model


# What `core.request` checks beyond its declared constraints, as JSON Schema patterns (the
# validators cannot be introspected). "\S" is not used: Python's str.strip and JSON Schema's
# \s disagree on a few control characters, so "not blank" is spelled out as "some character
# that is neither NUL nor whitespace", with whitespace as str.isspace() defines it.
_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
TEXT_PATTERNS: dict[str, str] = {
    "prompt": rf"^[^\x00]*[^\x00{_SPACE}][^\x00]*$",
    "negative_prompt": r"^[^\x00]*$",
}

MODEL_NAMES_MARK = "x-auraserve-model-names"
"""Marks a body field naming a model; `tidy_document` replaces it by the enum of the configured
presets plus the aliases it carries (routes are declared before the configuration is known)."""

_FASTAPI_VALIDATION_REF = "#/components/schemas/HTTPValidationError"
_LOCAL_DEFS = "#/$defs/"


def tidy_document(doc: dict[str, Any], presets: Sequence[str]) -> dict[str, Any]:
    """Make FastAPI's generated document say what the server really does.

    * `{model_id}` path parameters are one of the configured `presets`; body fields marked
      with `MODEL_NAMES_MARK` one of those or their aliases.
    * Schemas derived from pydantic models carry their own `$defs` (`#/$defs/X`), which means
      nothing inside an OpenAPI document; they move to `components/schemas`.
    * An optional header, query or path parameter is either sent or not: it can never be
      JSON `null`, so `anyOf: [X, null]` becomes X.
    * FastAPI documents a 422 `HTTPValidationError` on every route with parameters, but the
      server answers a parameter it cannot read with the dialect's 400 (`api.errors`); the
      422 goes, and a 400 in the queue shape is added where the route declares none.
    * A route serving several methods gets one operation id per method.
    """
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    _hoist_defs(doc.get("paths", {}), components)
    seen: dict[str, int] = {}
    for item in doc.get("paths", {}).values():
        for operation in item.values():
            for param in operation.get("parameters", []):
                if param.get("in") in ("header", "query", "path"):
                    param["schema"] = not_null(param.get("schema", {}))
                if param.get("in") == "path" and param.get("name") == "model_id":
                    param["schema"] = {**param["schema"], "enum": list(presets)}
            responses = operation.get("responses", {})
            validation = responses.get("422", {})
            if _FASTAPI_VALIDATION_REF in str(validation):
                del responses["422"]
                typed = any(_is_typed(p.get("schema", {})) for p in operation.get("parameters", []))
                if typed and "400" not in responses:
                    responses["400"] = {
                        "description": _DESCRIPTIONS[400],
                        "content": {
                            "application/json": {"schema": {"$ref": _component("ErrorBody")}}
                        },
                    }
            op_id = operation.get("operationId")
            if op_id:
                seen[op_id] = seen.get(op_id, 0) + 1
    for item in doc.get("paths", {}).values():
        for method, operation in item.items():
            op_id = operation.get("operationId")
            if op_id and seen.get(op_id, 0) > 1:
                operation["operationId"] = f"{op_id}_{method}"
    _name_models(doc, presets)
    if "ErrorBody" not in components:
        components["ErrorBody"] = ErrorBody.model_json_schema(ref_template=_component("{model}"))
    if _FASTAPI_VALIDATION_REF not in str(doc.get("paths")):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
    return doc


def _name_models(node: Any, presets: Sequence[str]) -> None:
    if isinstance(node, dict):
        aliases = node.pop(MODEL_NAMES_MARK, None)
        if aliases is not None:
            names = [*presets, *(a for a in aliases if a not in presets)]
            for option in node.get("anyOf", [node]):
                if option.get("type") == "string":
                    option["enum"] = names
        for value in node.values():
            _name_models(value, presets)
    elif isinstance(node, list):
        for value in node:
            _name_models(value, presets)


def _component(name: str) -> str:
    return f"#/components/schemas/{name}"


def _hoist_defs(node: Any, components: dict[str, Any]) -> None:
    if isinstance(node, dict):
        defs = node.pop("$defs", None)
        if isinstance(defs, dict):
            for name, schema in defs.items():
                _hoist_defs(schema, components)
                components.setdefault(name, schema)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_LOCAL_DEFS):
            node["$ref"] = _component(ref[len(_LOCAL_DEFS) :])
        for value in node.values():
            _hoist_defs(value, components)
    elif isinstance(node, list):
        for value in node:
            _hoist_defs(value, components)


def not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [X, null]` as X: for values that are either sent or not, never JSON null."""
    options = [o for o in schema.get("anyOf", []) if o.get("type") != "null"]
    if "anyOf" not in schema or len(options) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**options[0], **rest}


def _is_typed(schema: dict[str, Any]) -> bool:
    """Whether a parameter can fail FastAPI's own validation (a free string cannot)."""
    return schema.get("type") != "string" or any(
        key in schema for key in ("enum", "pattern", "maxLength", "minLength", "format")
    )


def int_range_pattern(low: int, high: int) -> str:
    """A regular-expression group matching the decimal integers `low`..`high` (no sign, no
    leading zeros), so a bound can be stated where JSON Schema only offers a pattern."""
    if not 0 <= low <= high:
        raise ValueError("need 0 <= low <= high")
    return "(?:" + "|".join(_range_parts(str(low), str(high))) + ")"


def _range_parts(low: str, high: str) -> list[str]:
    if len(low) < len(high):
        # Split at the digit-count boundary: low..99…9, then 10…0..high.
        return _range_parts(low, "9" * len(low)) + _range_parts("1" + "0" * len(low), high)
    if low == high:
        return [low]
    if len(low) == 1:
        return [f"[{low}-{high}]"]
    if low[0] == high[0]:
        return [low[0] + part for part in _range_parts(low[1:], high[1:])]
    rest = len(low) - 1
    parts = [low[0] + part for part in _range_parts(low[1:], "9" * rest)]
    if int(high[0]) - int(low[0]) > 1:
        parts.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}]" + r"\d" * rest)
    parts += [high[0] + part for part in _range_parts("0" * rest, high[1:])]
    return parts
