"""Reading request bodies into plain dicts, with 4xx errors instead of 500s."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from auraserve.errors import InvalidParameter


async def json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise InvalidParameter(field="body", message="body: expected a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidParameter(field="body", message=f"body: malformed JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidParameter(field="body", message="body: expected a JSON object")
    return data
