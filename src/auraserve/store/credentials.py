"""The random credentials the store issues: API keys and webhook signing secrets.

Generation lives here, below both the store (which persists them) and the webhooks (which sign
with the secret), so neither has to import the other. Only `secrets` is used, never `random`:
these values are all that stands between a client and someone impersonating it, or forging
its job-status callbacks.
"""

from __future__ import annotations

import base64
import secrets

KEY_PREFIX = "aura"
"""First part of every API key: `aura_<key id>_<secret>`."""

KEY_ID_BYTES = 8
"""The public key id: 16 hex characters, the row's primary key."""

KEY_SECRET_BYTES = 32
"""The key's secret part: 256 bits, base64url (43 characters)."""

WEBHOOK_SECRET_PREFIX = "whsec_"
"""Prefix of every webhook secret, as Standard Webhooks and its reference libraries expect."""

WEBHOOK_SECRET_BYTES = 32
"""Random bytes in a webhook secret: 256 bits, inside the standard's 24–64 byte range."""


def new_api_key() -> tuple[str, str]:
    """A fresh API key as `(key id, whole key)`; the whole key is shown once, never stored."""
    key_id = secrets.token_hex(KEY_ID_BYTES)
    secret = secrets.token_urlsafe(KEY_SECRET_BYTES)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


def new_webhook_secret() -> str:
    """A fresh webhook signing secret: ``whsec_`` + base64 of 32 random bytes."""
    raw = secrets.token_bytes(WEBHOOK_SECRET_BYTES)
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(raw).decode("ascii")
