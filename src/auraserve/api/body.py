"""Reading request bodies into plain dicts, with 4xx errors instead of 500s.

Numbers, decided per dialect (issue 10):

| dialect | `3`, `3.0` | `"3"`, `"3.0"` | `"1_0"`, `" 3"`, `"0x10"`, `"+3"` |
| --- | --- | --- | --- |
| sync (seed 000, form data) | yes | yes: form values are strings | no |
| queue (seed 002, JSON) | yes | no: the seed types them `integer`/`number` | no |
| openai (JSON) | yes | no: OpenAI's schema types them | no |

`3.0` is an integer in JSON Schema (a zero fraction), so an integer field takes it in all three;
`2.5` there is refused everywhere. A numeric string, where accepted, must be a JSON number
literal (so `"1e3"` is 1000, as `1e3` is in JSON): Python's own `int()` would also take
underscores, spaces, a plus sign and other scripts' digits, which no client writes on purpose.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from fastapi import Request

from auraserve.api.deps import dialect_of
from auraserve.api.dialect import Dialect, DialectName
from auraserve.core.request import GenerationRequest
from auraserve.errors import InvalidParameter

# No dialect's body is deeper than a few levels; a cap far above that keeps any later walk over
# the body (validation, hashing for idempotency, logging) away from Python's recursion limit.
MAX_DEPTH = 32


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """`raw` as a JSON object, or InvalidParameter(field="body") naming what is wrong."""
    if not raw.strip():
        raise InvalidParameter(field="body", message="body: expected a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidParameter(field="body", message=f"body: malformed JSON ({exc})") from None
    except RecursionError:
        raise InvalidParameter(
            field="body", message=f"body: JSON nested deeper than {MAX_DEPTH} levels"
        ) from None
    except ValueError as exc:
        # The only other ValueError the decoder raises: an integer literal over Python's
        # int-to-str digit limit (4300 digits), which no field accepts anyway.
        raise InvalidParameter(
            field="body", message=f"body: number too long ({str(exc).split(':')[0]})"
        ) from None
    if not isinstance(data, dict):
        raise InvalidParameter(field="body", message="body: expected a JSON object")
    if _depth_exceeds(data, MAX_DEPTH):
        raise InvalidParameter(
            field="body", message=f"body: JSON nested deeper than {MAX_DEPTH} levels"
        )
    return data


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, numbers read by the route's dialect (`read_numbers`)."""
    data = parse_json_object(await request.body())
    dialect = dialect_of(request.scope)
    return data if dialect is None else read_numbers(data, dialect)


# Dialects whose numbers may arrive as strings: form data has no other type.
NUMBER_STRINGS = frozenset({DialectName.SYNC})
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
# Longer than any valid value of any field; keeps int() away from its digit limit.
_MAX_NUMBER_CHARS = 40
_NUMERIC: dict[str, type] = {
    name: int if field.annotation is int else float
    for name, field in GenerationRequest.model_fields.items()
    if field.annotation in (int, float)
}


def read_numbers(data: Mapping[str, Any], dialect: Dialect) -> dict[str, Any]:
    """`data` with the numeric fields' strings read as numbers where `dialect` takes them
    (`NUMBER_STRINGS`), or refused naming the field; ranges are `build_request`'s."""
    out = dict(data)
    strings = dialect.name in NUMBER_STRINGS
    for own, canonical in dialect.fields.items():
        kind = _NUMERIC.get(canonical)
        value = data.get(own)
        if kind is None or not isinstance(value, str):
            continue
        noun = "an integer" if kind is int else "a number"
        if not strings:
            raise InvalidParameter(
                field=own, message=f"{own}: must be {noun}, not a string", allowed=noun
            )
        if len(value) > _MAX_NUMBER_CHARS or not _NUMBER.fullmatch(value):
            raise InvalidParameter(
                field=own,
                message=f"{own}: must be {noun} in decimal digits (like 25 or 1.5)",
                allowed=noun,
            )
        out[own] = int(value) if _INTEGER.fullmatch(value) else float(value)
    if not strings:
        _refuse_string_scales(data, dialect)
    return out


def _refuse_string_scales(data: Mapping[str, Any], dialect: Dialect) -> None:
    """`loras[].scale` is a number like the top-level ones: the same rule, one level down."""
    for own, canonical in dialect.fields.items():
        value = data.get(own)
        if canonical != "loras" or not isinstance(value, list):
            continue
        for index, item in enumerate(value):
            if isinstance(item, Mapping) and isinstance(item.get("scale"), str):
                name = f"{own}[{index}].scale"
                raise InvalidParameter(
                    field=name,
                    message=f"{name}: must be a number, not a string",
                    allowed="a number",
                )


def _depth_exceeds(value: object, limit: int) -> bool:
    # Iterative on purpose: the check exists because recursion over client data is unsafe.
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
