"""Reading request bodies into plain dicts, with 4xx errors instead of 500s.

Content types, one rule for every dialect (`media_type`): a body is read only when its
`Content-Type` names a type the route takes (the Queue API and OpenAI Images: JSON; the Sync
API: JSON or form data), in UTF-8 (no `charset`, or `charset=utf-8`). Anything else, a missing
header included, is 415 in the route's error shape, naming the types it takes: guessing would
read a `text/plain` or UTF-16 body differently from what the client meant.

Numbers, decided per dialect:

| dialect | `3`, `3.0` | `"3"`, `"3.0"` | `"1_0"`, `" 3"`, `"0x10"`, `"+3"` |
| --- | --- | --- | --- |
| Sync API (form data) | yes | yes: form values are strings | no |
| Queue API (JSON) | yes | no: its reference types them `integer`/`number` | no |
| OpenAI Images (JSON) | yes | no: OpenAI's schema types them | no |

`3.0` is an integer in JSON Schema (a zero fraction), so an integer field takes it in all three;
`2.5` there is refused everywhere. A numeric string, where accepted, must be a JSON number
literal (so `"1e3"` is 1000, as `1e3` is in JSON): Python's own `int()` would also take
underscores, spaces, a plus sign and other scripts' digits, which no client writes on purpose.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from python_multipart.multipart import parse_options_header

from auraserve.api.deps import dialect_of
from auraserve.api.dialect import Dialect, DialectName
from auraserve.core.request import GenerationRequest
from auraserve.errors import InvalidParameter, UnsupportedMediaType

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


JSON = "application/json"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_UTF8 = frozenset({"utf-8", "utf8"})


def media_type(request: Request, accepted: Sequence[str]) -> str:
    """The body's media type (lower case, no parameters) if it is one of `accepted` (JSON
    accepts `+json` types too) in UTF-8; otherwise UnsupportedMediaType naming `accepted`."""
    header = request.headers.get("content-type")
    if header is None or not header.strip():
        raise UnsupportedMediaType("the request has no Content-Type", accepted)
    raw_type, params = parse_options_header(header)
    kind = raw_type.decode("latin-1").strip().lower()
    shown = header.strip()[:100]
    readable = kind in accepted or (JSON in accepted and kind.endswith("+json"))
    if not readable:
        raise UnsupportedMediaType(f"Content-Type '{shown}' is not accepted", accepted)
    charset = params.get(b"charset")
    if charset is not None and charset.decode("latin-1").strip().lower() not in _UTF8:
        raise UnsupportedMediaType(
            f"charset '{charset.decode('latin-1')[:40]}' is not read; bodies are UTF-8", accepted
        )
    return kind


async def json_object(request: Request) -> dict[str, Any]:
    """The JSON body (refused unless its Content-Type is JSON in UTF-8) as an object, numbers
    read by the route's dialect (`read_numbers`)."""
    media_type(request, (JSON,))
    return await read_json_body(request)


async def read_json_body(request: Request) -> dict[str, Any]:
    """`json_object` once the content type has been checked."""
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
