"""The credentials the store issues: API keys, and webhook signing secrets derived from the
server key.

Generation lives in `core`, below both the store (which persists them) and the webhooks (which
sign with the secret), so neither has to import the other; it touches no database. Only
`secrets` is used, never `random`: these values are all that stands between a client and
someone impersonating it, or forging its job-status callbacks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

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


# --- the server key and the webhook secrets derived from it ------------------------------

SERVER_KEY_FILE = "secret.key"
"""The embedded default's server key, in the data dir (mode 0600), made on first start."""

SERVER_KEY_BYTES = 32
"""Random bytes in a generated server key."""

MIN_SERVER_KEY_CHARS = 32
"""A configured key shorter than this is refused: it would be guessable."""

_WEBHOOK_LABEL = b"auraserve/webhook-secret/v1"


@dataclass(frozen=True, repr=False)
class ServerKey:
    """The one secret every replica shares (`AURASERVE_SECRET_KEY` or a file). Webhook signing
    secrets are derived from it, HMAC-SHA256(key, account id, version), so the database holds
    only a version number: a copy of the database alone cannot forge a callback, and bumping
    the version rotates a secret."""

    key: bytes
    source: str = field(default="", compare=False)
    # True when this process made the key file (a first start): the CLI says where it is.
    created: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.key) < MIN_SERVER_KEY_CHARS:
            raise ValueError(f"the server key must be at least {MIN_SERVER_KEY_CHARS} bytes")

    def __repr__(self) -> str:  # never print the key itself, e.g. in a traceback's locals
        return f"ServerKey(source={self.source!r})"

    @classmethod
    def random(cls) -> ServerKey:
        """A key that lives as long as this object (tests and tools without a data dir)."""
        return cls(secrets.token_bytes(SERVER_KEY_BYTES), source="random, in memory")

    def webhook_secret(self, account_id: str, version: int) -> str:
        """The account's `whsec_` secret at `version`, as Standard Webhooks spells it."""
        message = b"\x00".join((_WEBHOOK_LABEL, account_id.encode(), str(version).encode()))
        digest = hmac.new(self.key, message, hashlib.sha256).digest()
        return WEBHOOK_SECRET_PREFIX + base64.b64encode(digest).decode("ascii")


def load_server_key(value: str | None, path: Path | None, data_dir: Path) -> ServerKey:
    """The server key: `value` when set (`AURASERVE_SECRET_KEY`), else the file at `path`
    (`AURASERVE_SECRET_KEY_FILE`), else `data_dir/secret.key`, created 0600 on first use.

    Several replicas must share one key: set the value or point every replica at one file.

    Raises:
        ValueError: the key is shorter than `MIN_SERVER_KEY_CHARS`, or a named file is missing.
    """
    if value:
        return ServerKey(value.encode(), source="AURASERVE_SECRET_KEY")
    if path is not None:
        try:
            return ServerKey(path.read_bytes().strip(), source=str(path))
        except FileNotFoundError:
            raise ValueError(f"secret key file {path} does not exist") from None
    default = data_dir / SERVER_KEY_FILE
    try:
        # O_EXCL: two processes starting at once must not both write a key; the loser reads.
        fd = os.open(default, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return ServerKey(default.read_bytes().strip(), source=str(default))
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_urlsafe(SERVER_KEY_BYTES).encode() + b"\n")
    # INFO, not WARNING: the CLI names the new file itself, on the one line it prints.
    log.info("created the server key %s (mode 0600)", default)
    return ServerKey(default.read_bytes().strip(), source=str(default), created=True)
