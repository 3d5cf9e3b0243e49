"""GenerationRequest: the one canonical, validated request that every API dialect maps into.

Every parameter's range, default and rule lives here and only here. A dialect adapter renames
its fields into these names, calls `build_request`, and gets back either a request or an
`InvalidParameter` error that already speaks the dialect's field name.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Annotated, Any

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from auraserve.core.presets import ModelPreset
from auraserve.core.samplers import (
    MEDIA_TYPES,
    OUTPUT_FORMATS,
    SAMPLERS,
    SCHEDULERS,
    OutputFormat,
    SamplerName,
    SchedulerName,
)
from auraserve.errors import InvalidParameter

MAX_PROMPT_CHARS = 10_000
MAX_SEED = 2**53 - 1  # the largest integer every JSON client (JavaScript included) keeps exact
SIZE_MULTIPLE = 16  # VAE downsampling (8) times the transformer's patch size (2)
REFERENCE_PIXELS = 1024 * 1024
REFERENCE_STEPS = 25


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


class GenerationRequest(BaseModel):
    """A fully resolved request: every field set, sizes rounded, seed chosen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    prompt: Annotated[
        str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    ]
    negative_prompt: Annotated[
        str, Field(max_length=MAX_PROMPT_CHARS, description="What to keep out of the image.")
    ] = ""
    num_images: Annotated[int, Field(ge=1, le=10, description="Images in this request.")] = 1
    guidance_scale: Annotated[
        float, Field(ge=0, le=20, allow_inf_nan=False, description="Classifier-free guidance.")
    ]
    steps: Annotated[int, Field(ge=1, le=100, description="Denoising steps.")]
    width: Annotated[
        int, Field(ge=512, le=2048, description="Pixels; rounded to a multiple of 16.")
    ]
    height: Annotated[
        int, Field(ge=512, le=2048, description="Pixels; rounded to a multiple of 16.")
    ]
    seed: Annotated[
        int, Field(ge=0, le=MAX_SEED, description="Image i uses seed + i; random when absent.")
    ]
    shift: Annotated[
        float, Field(ge=0, le=10, allow_inf_nan=False, description="Flow-matching time shift.")
    ]
    sampler: SamplerName
    scheduler: SchedulerName
    output_format: OutputFormat
    output_quality: Annotated[
        int, Field(ge=0, le=100, description="Quality for lossy formats (webp, jpeg).")
    ]
    expand_prompt: bool = False

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _text(cls, value: str) -> str:
        return _no_nul(value)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("width", "height")
    @classmethod
    def _round_size(cls, value: int) -> int:
        # Round to the nearest multiple of 16; 512..2048 are multiples, so the range still holds.
        return math.floor(value / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE

    @field_validator("output_format", mode="before")
    @classmethod
    def _format(cls, value: object) -> object:
        # Formats are case-insensitive and "jpg" means "jpeg", as in the seeds' examples.
        if isinstance(value, str):
            value = value.lower()
            return "jpeg" if value == "jpg" else value
        return value

    @property
    def seeds(self) -> list[int]:
        """Image i uses seed + i, so a request's images can be reproduced one by one."""
        return [self.seed + i for i in range(self.num_images)]

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.output_format]

    @property
    def batch_key(self) -> str:
        """Jobs with equal keys can share one batched forward pass without changing any image."""
        return (
            f"{self.model}|{self.width}x{self.height}|{self.steps}|{self.sampler}|"
            f"{self.scheduler}|{self.shift:g}"
        )

    def price(self, preset: ModelPreset) -> int:
        """Credits for the whole request: the preset's price per reference image (1024², 25
        steps) scaled linearly by pixels and steps, rounded up per image, at least 1 per image
        unless the preset is free."""
        if preset.price_per_image == 0:
            return 0
        per_image = math.ceil(
            preset.price_per_image
            * self.width
            * self.height
            * self.steps
            / (REFERENCE_PIXELS * REFERENCE_STEPS)
        )
        return max(1, per_image) * self.num_images


# Defaults that come from the preset when a dialect leaves a field out.
_PRESET_DEFAULTS = (
    "width",
    "height",
    "steps",
    "guidance_scale",
    "shift",
    "sampler",
    "scheduler",
    "output_format",
    "output_quality",
)

_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "str": "a string",
}


def bounds(name: str) -> tuple[Any, Any]:
    """A canonical numeric field's declared (minimum, maximum); None where it has none."""
    field = GenerationRequest.model_fields[name]
    low = high = None
    for meta in field.metadata:
        if isinstance(meta, annotated_types.Ge):
            low = meta.ge
        elif isinstance(meta, annotated_types.Le):
            high = meta.le
    return low, high


def _allowed(name: str) -> str:
    """Describe a canonical field's allowed values from its declared constraints."""
    if name == "sampler":
        return "one of: " + ", ".join(SAMPLERS)
    if name == "scheduler":
        return "one of: " + ", ".join(SCHEDULERS)
    if name == "output_format":
        return "one of: " + ", ".join(OUTPUT_FORMATS)
    field = GenerationRequest.model_fields.get(name)
    if field is None:
        return ""
    low, high = bounds(name)
    max_len = None
    for meta in field.metadata:
        if isinstance(meta, annotated_types.MaxLen):
            max_len = meta.max_length
    kind = _TYPE_WORDS.get(getattr(field.annotation, "__name__", ""), "a value")
    if low is not None and high is not None:
        return f"{kind} from {low:g} to {high:g}"
    if max_len is not None:
        return f"{kind} of 1 to {max_len} characters"
    return kind


def map_fields(data: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """A dialect's body in canonical names: `fields` maps the dialect's names to canonical
    ones; names it does not list are ignored, as the hosted APIs ignore unknown fields."""
    return {fields[name]: value for name, value in data.items() if name in fields}


def build_request(
    fields: Mapping[str, Any],
    *,
    model: str,
    preset: ModelPreset,
    names: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> GenerationRequest:
    """Validate a dialect's fields (already renamed to canonical names) into a request.

    `names` maps canonical names back to the dialect's, so errors name what the client sent.
    Missing fields take the dialect's `defaults` first, then the preset's; a missing seed is
    drawn at random.
    """
    data: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    for key, value in (defaults or {}).items():
        data.setdefault(key, value)
    for key in _PRESET_DEFAULTS:
        data.setdefault(key, getattr(preset, key))
    if "seed" not in data:
        data["seed"] = secrets.randbelow(2**32)
    data["model"] = model
    for key, value in data.items():
        # pydantic's lax mode would read true as 1; a boolean is never a valid number here.
        if isinstance(value, bool) and key not in ("expand_prompt",):
            field = GenerationRequest.model_fields.get(key)
            if field is not None and field.annotation is not bool:
                raise _invalid(key, "wrong type", names)
    try:
        return GenerationRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "body"
        if err["type"] == "missing":
            raise _invalid(key, "is required", names) from None
        if err["type"] == "literal_error":
            raise _invalid(
                key, "must be one of: " + _allowed(key).removeprefix("one of: "), names
            ) from None
        if err["type"] == "extra_forbidden":
            raise InvalidParameter(
                field=(names or {}).get(key, key),
                message=f"{(names or {}).get(key, key)}: unknown field",
            ) from None
        reason = str(err["msg"]).removeprefix("Value error, ")
        raise _invalid(key, reason, names) from None


def _invalid(key: str, reason: str, names: Mapping[str, str] | None) -> InvalidParameter:
    public = (names or {}).get(key, key)
    allowed = _allowed(key)
    message = f"{public}: {reason}"
    if allowed and allowed.removeprefix("one of: ") not in reason:
        message += f"; allowed: {allowed}"
    return InvalidParameter(field=public, message=message, allowed=allowed or None)
