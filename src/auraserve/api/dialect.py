"""The dialect seam: what one public API shape owns, declared in one place.

A dialect (`api/dialects/queue.py`, `sync.py`, `openai.py`) is a `Dialect` subclass that owns
its field names (`fields`: its name → the canonical one), its defaults for absent fields, the
way it resolves a model, and the shape and status of its errors. Everything else (ranges,
rounding, seeds, prices) is `core.request`'s. A route's dialect is set by its router
(`api.deps.use_dialect`); nothing reads it off the URL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from auraserve.api.image_field import check_image_url
from auraserve.api.openapi import ErrorBody, error_responses
from auraserve.config import Settings
from auraserve.core.request import GenerationRequest, build_request, map_fields
from auraserve.errors import AuraserveError, InvalidParameter, ModelNotFound


class DialectName(StrEnum):
    """Also part of each Idempotency-Key fingerprint, so the values must not change."""

    QUEUE = "queue"
    SYNC = "sync"
    OPENAI = "openai"


@dataclasses.dataclass(frozen=True)
class Problem:
    """An error on its way to a response: the domain error's parts after the dialect adjusted
    its status, or an HTTP-level error (404 of an unknown path) that has no domain class."""

    status: int
    title: str
    message: str
    field: str | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # The domain error, when there is one: dialects derive their own codes from its class.
    error: AuraserveError | None = None


class Dialect:
    """The Queue API's shape is the base: `{"error": title, "message": text}`, plus
    `field` for a parameter error and the error's `extra` fields."""

    name: ClassVar[DialectName]
    # The dialect's field name → the canonical (core.request) name; unlisted fields are ignored.
    fields: ClassVar[Mapping[str, str]]
    # Canonical names whose value the dialect derives from one of its own fields (OpenAI's
    # `size` gives width and height): errors about them name the dialect's field.
    derived: ClassVar[Mapping[str, str]] = {}
    # Canonical values for absent fields, applied before the preset's defaults.
    defaults: ClassVar[Mapping[str, Any]] = {}
    # Model names that mean the default preset (OpenAI's own model names).
    model_aliases: ClassVar[frozenset[str]] = frozenset()
    # The body field that names the model; None when the model is in the URL.
    model_field: ClassVar[str | None] = None
    # The error body, for the OpenAPI document.
    error_model: ClassVar[type[BaseModel]] = ErrorBody

    @property
    def names(self) -> dict[str, str]:
        """Canonical name → the dialect's, for errors that name what the client sent."""
        return {canonical: own for own, canonical in self.fields.items()} | dict(self.derived)

    def resolve_model(self, settings: Settings, requested: object) -> str:
        """The preset a request names: absent or an alias means the default preset. An unknown
        name in the URL is ModelNotFound; in a body field, a parameter error naming it."""
        if requested is None or (isinstance(requested, str) and requested in self.model_aliases):
            return settings.default_preset
        if isinstance(requested, str) and requested in settings.presets:
            return requested
        if self.model_field is None:
            raise ModelNotFound(str(requested))
        raise InvalidParameter(
            field=self.model_field,
            message=f"{self.model_field}: the model '{str(requested)[:100]}' does not exist; "
            "use one of: " + ", ".join(sorted(settings.presets)),
            allowed=", ".join(sorted(settings.presets)),
        )

    def canonical(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """The body's fields in canonical names (dialects with derived fields add them)."""
        return map_fields(data, self.fields)

    def build(
        self,
        settings: Settings,
        model_id: str,
        fields: Mapping[str, Any],
        *,
        defaults: Mapping[str, Any] | None = None,
    ) -> GenerationRequest:
        """Validate canonical `fields` into a request; errors speak this dialect's names."""
        request = build_request(
            fields,
            model=model_id,
            preset=settings.presets[model_id],
            names=self.names,
            defaults=self.defaults if defaults is None else defaults,
            loras=settings.loras_for(model_id) if "loras" in fields else None,
        )
        check_image_url(request, settings, self.names)
        return request

    # --- errors --------------------------------------------------------------------------

    def problem(self, exc: AuraserveError) -> Problem:
        return Problem(
            status=self.status_of(exc),
            title=exc.title,
            message=exc.message,
            field=exc.field if isinstance(exc, InvalidParameter) else None,
            headers=exc.headers,
            extra=exc.extra,
            error=exc,
        )

    def status_of(self, exc: AuraserveError) -> int:
        return exc.status

    def error_body(self, problem: Problem) -> dict[str, Any]:
        body: dict[str, Any] = {"error": problem.title, "message": problem.message}
        if problem.field is not None:
            body["field"] = problem.field
        body.update(problem.extra)
        return body

    def error_responses(self, *codes: int) -> dict[int | str, dict[str, Any]]:
        """OpenAPI `responses` for these error statuses, in this dialect's body shape."""
        return error_responses(self.error_model, *codes)

    def render(self, problem: Problem) -> JSONResponse:
        return JSONResponse(
            self.error_body(problem), status_code=problem.status, headers=dict(problem.headers)
        )
