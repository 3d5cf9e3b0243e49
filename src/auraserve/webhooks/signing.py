"""Standard Webhooks signatures for outgoing job-status callbacks.

We sign exactly as https://www.standardwebhooks.com specifies so that receivers can verify our
deliveries with any off-the-shelf Standard Webhooks library (Svix, `standardwebhooks`, ...)
instead of hand-rolling HMAC code:

* the secret is ``whsec_`` followed by the base64 of random bytes; the HMAC key is the decoded
  bytes, not the text;
* the signed content is ``{webhook-id}.{webhook-timestamp}.{body}``, where the body is the exact
  bytes we send (receivers must verify the raw body, before any JSON re-encoding);
* the signature header is a space-separated list of ``v1,<base64 HMAC-SHA256>`` entries, which is
  what makes secret rotation possible: during a rotation we sign with both secrets.

The message id doubles as the receiver's idempotency key, so a redelivery of the same event must
reuse the same id (the caller owns the id; this module never invents one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Sequence

# The store issues the secret when it creates an account, so generation lives there; these
# names stay here too because receivers and tests think of them as part of the signing scheme.
from auraserve.core.credentials import WEBHOOK_SECRET_BYTES, WEBHOOK_SECRET_PREFIX
from auraserve.core.credentials import new_webhook_secret as new_secret

SECRET_PREFIX = WEBHOOK_SECRET_PREFIX
SECRET_BYTES = WEBHOOK_SECRET_BYTES

SIGNATURE_VERSION = "v1"
"""The symmetric HMAC-SHA256 scheme; ``v1a`` (ed25519) is not used."""

__all__ = [
    "SECRET_BYTES",
    "SECRET_PREFIX",
    "SIGNATURE_VERSION",
    "new_secret",
    "secret_key",
    "sign",
    "signed_headers",
]


def secret_key(secret: str) -> bytes:
    """Decode a ``whsec_`` secret into the raw HMAC key.

    The prefix is optional (the reference libraries accept bare base64 too). Decoding is strict
    apart from missing padding: a typo in a configured secret must fail loudly here rather than
    produce signatures no receiver can verify.

    Raises:
        ValueError: the secret is empty or not valid base64.
    """
    encoded = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    encoded = encoded.strip()
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook secret is not valid base64 after the 'whsec_' prefix") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def _check_header_token(name: str, value: str) -> None:
    """Refuse values that would break (or inject into) an HTTP header line."""
    if not value or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"{name} must be non-empty and contain no whitespace or control chars")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return ``v1,<base64 HMAC-SHA256(key, f"{msg_id}.{timestamp}.{body}")>``.

    The body is concatenated as bytes (not decoded) so that what we sign is byte-for-byte what we
    send; for UTF-8 JSON this equals the standard's string formulation.
    """
    _check_header_token("msg_id", msg_id)
    key = secret_key(secret)
    to_sign = f"{msg_id}.{int(timestamp)}.".encode() + bytes(body)
    digest = hmac.new(key, to_sign, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signed_headers(
    secret: str | Sequence[str],
    msg_id: str,
    body: bytes,
    now: int | None = None,
) -> dict[str, str]:
    """Build the headers of one delivery attempt.

    Args:
        secret: the endpoint's secret, or several (old and new) while rotating; every secret
            contributes one signature, and receivers accept the message if any one matches.
        msg_id: the event's stable id (same across retries, so receivers can de-duplicate).
        body: the exact request body that will be sent.
        now: Unix seconds to stamp; defaults to the current time. It must be the time of *this*
            attempt, not of the event: receivers reject timestamps older than ~5 minutes, which
            is the standard's replay protection, so each retry is re-signed.

    Returns:
        ``webhook-id``, ``webhook-timestamp``, ``webhook-signature`` and
        ``content-type: application/json``.
    """
    timestamp = int(time.time()) if now is None else int(now)
    secrets_list = [secret] if isinstance(secret, str) else list(secret)
    if not secrets_list:
        raise ValueError("at least one webhook secret is required")
    signature = " ".join(sign(s, msg_id, timestamp, body) for s in secrets_list)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
        "content-type": "application/json",
    }
