"""LoRA adapters as a request names them, and the operator's registry of them (torch-free).

A request names adapters only by registry name. The registry is what the operator put in
`AURASERVE_LORA_DIR` (one `<name>.safetensors` file or one diffusers-format folder `<name>/`
per adapter) plus hub ids on `AURASERVE_LORA_HUB_ALLOWLIST`. A name is looked up as a key of
that listing and never joined to a path, so no request can make the server read an arbitrary
path or URL. The API lists the registry with `available_loras` to refuse unknown names with a
400; the engine resolves names through the same function, so both agree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import ErrorDetails

from auraserve.errors import InvalidParameter

logger = logging.getLogger(__name__)

MAX_LORAS = 4
MIN_LORA_SCALE = -2.0
MAX_LORA_SCALE = 2.0
# Extra credits per adapter, a fraction of the base price (see GenerationRequest.price).
LORA_PRICE_FRACTION = 0.1

LORAS_ALLOWED = (
    f"a list of at most {MAX_LORAS} objects {{name, scale}}: name from GET /v2/models, "
    f"scale from {MIN_LORA_SCALE:g} to {MAX_LORA_SCALE:g} (default 1)"
)

# A directory entry's name: no separators, no leading dot, so listing never leaves the folder.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# A hub id on the allowlist: owner/name, as the hub spells it.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# The weight file diffusers writes for a LoRA (`save_lora_weights`).
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class LoraSpec(BaseModel):
    """One adapter of a request: a registry name and the scale its update is multiplied by."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[
        str, Field(min_length=1, max_length=200, description="A name from GET /v2/models.")
    ]
    scale: Annotated[
        float,
        Field(
            ge=MIN_LORA_SCALE,
            le=MAX_LORA_SCALE,
            allow_inf_nan=False,
            description="Multiplies the adapter's update; 1 applies it as trained.",
        ),
    ] = 1.0


@dataclasses.dataclass(frozen=True)
class LoraSource:
    """Where a registry name's weights are: a local file, a local diffusers folder or a hub id."""

    name: str
    kind: Literal["file", "folder", "hub"]
    location: str  # a path for "file" and "folder", a hub id for "hub"


def is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value))


class Registry(dict[str, LoraSource]):
    """The usable adapters by name, plus `refused`: name → why an adapter in the folder
    cannot be used (a layout the engine does not apply), so a request naming it is told."""

    def __init__(self, found: Mapping[str, LoraSource], refused: Mapping[str, str]) -> None:
        super().__init__(found)
        self.refused = dict(refused)


def safetensors_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata of a .safetensors file, from its JSON header alone."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        if length > 100 * 2**20:
            raise ValueError("header too large")
        header = json.loads(file.read(length))
    metadata = header.pop("__metadata__", None) or {}
    return list(header), metadata


def refusal(keys: Iterable[str], metadata: Mapping[str, str]) -> str | None:
    """Why an adapter with these tensor names cannot be applied, or None. The engine applies
    low-rank (A, B) pairs; LyCORIS' Hadamard and Kronecker products and DoRA's magnitude
    vectors change the layer differently, so they are refused, not half applied."""
    keys = list(keys)
    only = "only LoRA: lora_A/lora_B or lora_down/lora_up"
    if any(".hada_w" in k for k in keys):
        return f"LyCORIS LoHa adapters are not supported ({only})"
    if any(".lokr_w" in k for k in keys):
        return f"LyCORIS LoKr adapters are not supported ({only})"
    if any(k.endswith(".dora_scale") or "lora_magnitude_vector" in k for k in keys):
        return "DoRA adapters are not supported (magnitude vectors); retrain without DoRA"
    config = " ".join(str(v) for v in metadata.values())
    if '"use_dora": true' in config:
        return "DoRA adapters are not supported (use_dora in its config); retrain without DoRA"
    return None


def _refusal_of(path: Path) -> str | None:
    try:
        keys, metadata = safetensors_header(path)
    except (OSError, ValueError, struct.error):
        return None  # unreadable: listed; the worker's start check names the file
    return refusal(keys, metadata)


def available_loras(lora_dir: Path | None, hub_allowlist: Iterable[str] = ()) -> Registry:
    """The registry: name → source, sorted by name. Directory entries shadow nothing: a hub id
    contains a slash and a directory name cannot, so the two never collide. Entries whose
    names do not match the safe pattern, hidden files and symlinks leaving the folder are
    skipped. Files in a layout the engine cannot apply (LyCORIS LoHa/LoKr, DoRA; read from
    the header alone) are left out with the reason in `Registry.refused`, logged once."""
    found: dict[str, LoraSource] = {}
    refused: dict[str, str] = {}
    if lora_dir is not None and lora_dir.is_dir():
        root = lora_dir.resolve()
        for entry in lora_dir.iterdir():
            source = _dir_entry(root, entry)
            if source is None:
                continue
            reason = _cached_refusal(*_weights_file(source))
            if reason is None:
                found[source.name] = source
            else:
                refused[source.name] = reason
    for hub_id in hub_allowlist:
        if is_hub_id(hub_id):
            found[hub_id] = LoraSource(name=hub_id, kind="hub", location=hub_id)
    return Registry(dict(sorted(found.items())), refused)


def _weights_file(source: LoraSource) -> tuple[Path, float]:
    path = Path(source.location)
    if source.kind == "folder":
        path = path / DIFFUSERS_WEIGHT_NAME
    try:
        return path, path.stat().st_mtime
    except OSError:
        return path, 0.0


_REFUSALS: dict[tuple[Path, float], str | None] = {}


def _cached_refusal(path: Path, mtime: float) -> str | None:
    """The folder is listed per request: read each file's header once per version of it."""
    key = (path, mtime)
    if key not in _REFUSALS:
        if len(_REFUSALS) > 10_000:
            _REFUSALS.clear()
        reason = _refusal_of(path)
        _REFUSALS[key] = reason
        if reason is not None:
            logger.warning("LoRA %s refused: %s", path, reason)
    return _REFUSALS[key]


def _dir_entry(root: Path, entry: Path) -> LoraSource | None:
    resolved = entry.resolve()
    if resolved.parent != root and root not in resolved.parents:
        return None
    if entry.suffix == ".safetensors" and resolved.is_file():
        name = entry.name.removesuffix(".safetensors")
        if _NAME.match(name):
            return LoraSource(name=name, kind="file", location=str(resolved))
        return None
    if resolved.is_dir() and _NAME.match(entry.name):
        weights = resolved / DIFFUSERS_WEIGHT_NAME
        if weights.is_file():
            return LoraSource(name=entry.name, kind="folder", location=str(resolved))
    return None


def check_lora_types(value: object, public: str) -> None:
    """pydantic's lax mode would read a boolean scale as 1 or 0; refuse it like every other
    boolean given for a number."""
    if not isinstance(value, list | tuple):
        return
    for index, item in enumerate(value):
        if isinstance(item, Mapping) and isinstance(item.get("scale"), bool):
            raise _invalid(f"{public}[{index}].scale", "wrong type")


def check_registry(
    loras: Iterable[LoraSpec], registry: Mapping[str, LoraSource], public: str
) -> None:
    """Refuse a name the operator did not register (400 naming the entry)."""
    refused: Mapping[str, str] = getattr(registry, "refused", {})
    for index, spec in enumerate(loras):
        if spec.name in refused and spec.name not in registry:
            raise InvalidParameter(
                field=f"{public}[{index}].name",
                message=f"{public}[{index}].name: LoRA '{spec.name[:100]}' cannot be used: "
                f"{refused[spec.name]}",
                allowed=", ".join(registry) or "none are configured",
            )
        if spec.name not in registry:
            known = ", ".join(registry) or "none are configured"
            raise InvalidParameter(
                field=f"{public}[{index}].name",
                message=f"{public}[{index}].name: unknown LoRA '{spec.name[:100]}'; "
                f"available: {known}",
                allowed=known,
            )


def lora_error(err: ErrorDetails, public: str) -> InvalidParameter:
    """A pydantic error inside `loras`, naming the exact entry and key the client sent."""
    loc = err["loc"][1:]
    where = public
    if loc and isinstance(loc[0], int):
        where += f"[{loc[0]}]"
        loc = loc[1:]
    if loc:
        where += "." + ".".join(str(part) for part in loc)
    reason = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "too_long":
        reason = f"at most {MAX_LORAS} adapters"
    elif err["type"] == "extra_forbidden":
        reason = "unknown field"
    elif err["type"] == "tuple_type":
        reason = "must be a list of objects"
    elif err["type"] == "model_type":
        reason = "must be an object"
    elif err["type"] == "missing":
        reason = "is required"
    return _invalid(where, reason)


def _invalid(where: str, reason: str) -> InvalidParameter:
    return InvalidParameter(
        field=where, message=f"{where}: {reason}; allowed: {LORAS_ALLOWED}", allowed=LORAS_ALLOWED
    )


__all__ = [
    "DIFFUSERS_WEIGHT_NAME",
    "LORAS_ALLOWED",
    "LORA_PRICE_FRACTION",
    "MAX_LORAS",
    "MAX_LORA_SCALE",
    "MIN_LORA_SCALE",
    "LoraSource",
    "LoraSpec",
    "Registry",
    "available_loras",
    "check_lora_types",
    "check_registry",
    "is_hub_id",
    "lora_error",
    "refusal",
    "safetensors_header",
]
