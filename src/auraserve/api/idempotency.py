"""The `Idempotency-Key` header: retries of one submit return the first response.

A key is bound to a fingerprint of what the client sent (dialect, path and the fields as
received, before defaults: a random seed drawn for one request must not make its retry look
different). The same key with a different fingerprint is a client bug and gets 422, as in
Stripe's and the IETF draft's semantics (draft-ietf-httpapi-idempotency-key-header).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Header, Request

from auraserve.errors import InvalidParameter

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
PATTERN = r"^[!-~]{1,255}$"  # printable ASCII, no spaces (documents `key_of`'s rule)

# Declared on every submit route so OpenAPI documents it; the value is read by `key_of`.
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        json_schema_extra={"pattern": PATTERN},
        description="Retries with the same key and body return the first result and are "
        "charged once (24 h)",
    ),
]


def key_of(request: Request) -> str | None:
    """The request's idempotency key, validated; None when absent."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    key = raw.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise InvalidParameter(
            field=HEADER,
            message=f"{HEADER}: must be 1 to {MAX_KEY_LENGTH} printable ASCII characters "
            "without spaces (a UUID is a good choice)",
        )
    return key


def fingerprint(dialect: str, path: str, fields: Mapping[str, Any], **extra: Any) -> str:
    """SHA-256 over what identifies a request; order of fields does not matter."""
    payload = {"dialect": dialect, "path": path, "fields": dict(fields), "extra": extra}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
