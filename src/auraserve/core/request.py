"""GenerationRequest: the one canonical, validated request that every API dialect maps into.

Every parameter's range, default and rule lives here and only here. A dialect adapter renames
its fields into these names, calls `build_request`, and gets back either a request or an
`InvalidParameter` error that already speaks the dialect's field name.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from auraserve.core.image_input import ALLOWED as IMAGE_ALLOWED
from auraserve.core.image_input import (
    DEFAULT_STRENGTH,
    image_digest,
    parse_image,
    steps_to_run,
)
from auraserve.core.lora import (
    LORA_PRICE_FRACTION,
    LORAS_ALLOWED,
    MAX_LORAS,
    LoraSource,
    LoraSpec,
    check_lora_types,
    check_registry,
    lora_error,
)
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
    exact: Annotated[
        bool,
        Field(
            description="Exact output only: no lossy speed mode (step cache) runs for this "
            "request. Same price. Images say how they were computed in `fidelity`."
        ),
    ] = False
    # Image-to-image (core/image_input.py): the API checks the form, the worker decodes.
    image: Annotated[
        str | None,
        Field(description="Input image: an https URL, a data: URI or base64 (PNG, JPEG, WebP)."),
    ] = None
    strength: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            allow_inf_nan=False,
            description="How much of the input to redraw: 0 keeps it, 1 ignores it (0.8 default "
            "with an image).",
        ),
    ] = 1.0
    # Set by build_request when an image comes without width/height: the worker then takes the
    # size from the image, within the pixels of width × height (the priced size).
    size_from_image: bool = False
    # Set by build_request, never by a client: how it changed what was sent (a size rounded to
    # a multiple of 16). The job's status lists them with the engine's own warnings.
    warnings: tuple[str, ...] = ()

    # LoRA adapters (core/lora.py), applied in this order; names are checked against the
    # operator's registry by build_request, not here (a stored job is re-validated on read).
    loras: Annotated[
        tuple[LoraSpec, ...],
        Field(max_length=MAX_LORAS, description="LoRA adapters: [{name, scale}], at most 4."),
    ] = ()

    @field_validator("loras")
    @classmethod
    def _distinct_loras(cls, value: tuple[LoraSpec, ...]) -> tuple[LoraSpec, ...]:
        names = [spec.name for spec in value]
        if len(set(names)) != len(names):
            raise ValueError("each adapter may appear once")
        return value

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
        # Formats are case-insensitive and "jpg" means "jpeg", as in the hosted APIs' examples.
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
        """Jobs with equal keys can share one batched forward pass without changing any image.

        The one definition of batch compatibility: the store writes it into each job's row and
        claims a batch by it, and the engine refuses a batch that mixes keys
        (`check_one_batch`). Everything else of a request (prompts, seed, guidance, images,
        output format) the engine reads per row."""
        key = (
            f"{self.model}|{self.width}x{self.height}|{self.steps}|{self.sampler}|"
            f"{self.scheduler}|{self.shift:g}"
        )
        if self.image is not None:
            # strength sets the start step; a size taken from the image is known only to the
            # worker, so only requests with the same image can share such a batch.
            key += f"|img{self.strength:g}"
            if self.size_from_image:
                key += f":{image_digest(self.image)}"
        if self.exact:
            # A lossy step cache runs per batch: exact jobs never share one with others.
            key += "|exact"
        if self.loras:
            # The adapter set is loaded per batch: only requests with the same adapters, in the
            # same order (the order of float additions) and scales may share one.
            key += "|lora:" + ",".join(f"{spec.name}@{spec.scale!r}" for spec in self.loras)
        return key

    @property
    def priced_steps(self) -> int:
        """The steps a request pays for: image-to-image runs only round(steps × strength) of
        them, and pays at least one for the VAE encode and decode even at strength 0."""
        if self.image is None:
            return self.steps
        return max(1, steps_to_run(self.steps, self.strength))

    def price(self, preset: ModelPreset) -> int:
        """Credits for the whole request: the preset's price per reference image (1024², 25
        steps) scaled linearly by pixels and `priced_steps`, rounded up per image, at least 1
        per image unless the preset is free."""
        if preset.price_per_image == 0:
            return 0
        per_image = math.ceil(
            preset.price_per_image
            * self.width
            * self.height
            * self.priced_steps
            / (REFERENCE_PIXELS * REFERENCE_STEPS)
        )
        per_image = max(1, per_image)
        # Each adapter adds LORA_PRICE_FRACTION of the base price, rounded up per image.
        per_image += math.ceil(per_image * LORA_PRICE_FRACTION * len(self.loras))
        return per_image * self.num_images


def check_one_batch(requests: Sequence[GenerationRequest]) -> None:
    """Raise ValueError unless every request has the first's `batch_key`: a mixed batch is
    the caller's bug (the store claims batches by key), so its jobs ERROR rather than FAIL."""
    if not requests:
        return
    key = requests[0].batch_key
    for request in requests[1:]:
        if request.batch_key != key:
            raise ValueError(
                f"a batch must share its batch key: {key!r} and {request.batch_key!r} differ"
            )


# Defaults that come from the preset when a dialect leaves a field out (the fields a client
# may tune per preset).
PRESET_DEFAULTS = (
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
    if name == "loras":
        return LORAS_ALLOWED
    if name == "image":
        return IMAGE_ALLOWED
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
    loras: Mapping[str, LoraSource] | None = None,
) -> GenerationRequest:
    """Validate a dialect's fields (already renamed to canonical names) into a request.

    `names` maps canonical names back to the dialect's, so errors name what the client sent.
    Missing fields take the dialect's `defaults` first, then the preset's; a missing seed is
    drawn at random. `loras` is the adapter registry (`core.lora.available_loras`): a
    request naming an adapter outside it is refused; None accepts no adapters at all.
    """
    data: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    data.pop("size_from_image", None)  # derived below, never taken from a client
    data.pop("warnings", None)  # likewise
    if "image" in data:
        data.setdefault("strength", DEFAULT_STRENGTH)
        data["size_from_image"] = "width" not in data and "height" not in data
    elif "strength" in data and str(data["strength"]).strip() not in ("1", "1.0"):
        # 1 is text-to-image, so a stored text request's parameters (history) resubmit as-is.
        raise _invalid("strength", "applies only with image", names)
    for key, value in (defaults or {}).items():
        data.setdefault(key, value)
    for key in PRESET_DEFAULTS:
        data.setdefault(key, getattr(preset, key))
    if "seed" not in data:
        # A seed is no secret (the response shows it): the urandom-seeded module generator
        # (reseeded in forked children) instead of `secrets`, whose urandom call per submit
        # showed as ~4% of a busy API process's samples.
        data["seed"] = random.getrandbits(32)
    data["model"] = model
    for key, value in data.items():
        # pydantic's lax mode would read true as 1; a boolean is never a valid number here.
        if isinstance(value, bool) and key not in ("expand_prompt", "exact"):
            field = GenerationRequest.model_fields.get(key)
            if field is not None and field.annotation is not bool:
                raise _invalid(key, "wrong type", names)
    if isinstance(data.get("image"), str):
        # Checked here, not in a field validator: a stored job is re-validated on every read
        # and must not decode megabytes of base64 each time.
        try:
            parse_image(data["image"])
        except ValueError as exc:
            raise _invalid("image", str(exc), names) from None
    check_lora_types(data.get("loras"), (names or {}).get("loras", "loras"))
    try:
        request = GenerationRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["loc"] and err["loc"][0] == "loras":
            raise lora_error(err, (names or {}).get("loras", "loras")) from None
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
    check_registry(request.loras, loras or {}, (names or {}).get("loras", "loras"))
    notes = _rounding_notes(fields, request, names)
    return request.model_copy(update={"warnings": notes}) if notes else request


def _rounding_notes(
    fields: Mapping[str, Any], request: GenerationRequest, names: Mapping[str, str] | None
) -> tuple[str, ...]:
    """One line per size the client sent that validation rounded to a multiple of 16."""
    notes = []
    for key in ("width", "height"):
        sent = fields.get(key)
        kept = getattr(request, key)
        try:
            # Validation accepted it, so it is an integral number (or such a string: forms).
            value = int(float(sent)) if sent is not None else kept
        except (TypeError, ValueError):
            continue
        if value != kept:
            public = (names or {}).get(key, key)
            where = "" if public == key else f"{public}: "
            notes.append(
                f"{where}{key} {value} was rounded to {kept} (sizes are multiples of "
                f"{SIZE_MULTIPLE})"
            )
    return tuple(notes)


def _invalid(key: str, reason: str, names: Mapping[str, str] | None) -> InvalidParameter:
    public = (names or {}).get(key, key)
    allowed = _allowed(key)
    message = f"{public}: {reason}"
    if allowed and allowed.removeprefix("one of: ") not in reason:
        message += f"; allowed: {allowed}"
    return InvalidParameter(field=public, message=message, allowed=allowed or None)
