"""The `image` field of an image-to-image request: its accepted forms and limits, torch-free.

The API process never decodes an image (a decoder is attack surface and CPU the API does not
have): it checks the field's *form* here, stores it with the job, and the worker fetches,
checks and decodes it (`worker/inputs.py`). Three forms are accepted:

* an ``https://`` URL (at most `MAX_URL_CHARS`); the API adds the webhooks' SSRF syntax check,
  the worker fetches it through the webhooks' pinned, address-checked connection;
* a ``data:image/<png|jpeg|webp>;base64,`` URI;
* a bare base64 string.

Inline bytes must decode as strict base64, stay within `MAX_INLINE_BYTES` and start with the
signature of PNG, JPEG or WebP: reading eight bytes of a header is a format sniff, not a decode,
and it turns "that is not an image" into a 400 at submit for every inline form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Literal

# Inline images travel in the JSON body, which AURASERVE_MAX_BODY_BYTES (4 MiB) bounds: 2 MiB
# of bytes is 2.67 MiB of base64, leaving room for the other fields.
MAX_INLINE_BYTES = 2 * 1024 * 1024
# A fetched image may be larger than an inline one: it does not pass through the body limit.
MAX_FETCH_BYTES = 16 * 1024 * 1024
# Decompression bombs: a small PNG can claim a huge canvas; refuse before allocating it.
MAX_INPUT_PIXELS = 4096 * 4096
MAX_URL_CHARS = 2048
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp")
DEFAULT_STRENGTH = 0.8  # the common image-to-image default (diffusers, A1111: 0.75–0.8)

_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)(?P<params>(?:;[^,;]*)*),", re.ASCII)
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/=\s_-]*", re.ASCII)

ALLOWED = (
    "an https:// URL, a data:image/(png|jpeg|webp);base64 URI or a base64 string of a PNG, "
    f"JPEG or WebP image of at most {MAX_INLINE_BYTES // (1024 * 1024)} MiB"
)


@dataclass(frozen=True)
class ImageSource:
    """The parsed field: a URL to fetch, or the image's bytes."""

    kind: Literal["url", "inline"]
    url: str = ""
    data: bytes = b""


def steps_to_run(total: int, strength: float) -> int:
    """How many of `total` steps image-to-image runs at `strength`: round half up, so the
    price (core.request) and the engine (engine.img2img) count the same steps."""
    return min(total, max(0, math.floor(total * strength + 0.5)))


def sniff(data: bytes) -> str | None:
    """The media type whose signature `data` starts with, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def parse_image(value: str) -> ImageSource:
    """The field's form checked; ValueError says what is wrong (the caller names the field)."""
    text = value.strip()
    if not text:
        raise ValueError("must not be empty")
    lowered = text[:8].lower()
    if lowered.startswith(("https://", "http://")):
        if len(text) > MAX_URL_CHARS:
            raise ValueError(f"the URL is longer than {MAX_URL_CHARS} characters")
        return ImageSource(kind="url", url=text)
    if "://" in text[:16]:
        raise ValueError("a URL must use https://")
    if lowered.startswith("data:"):
        match = _DATA_URI.match(text)
        if match is None:
            raise ValueError("malformed data: URI (expected data:image/png;base64,...)")
        media_type = match["type"].lower()
        if media_type not in IMAGE_MEDIA_TYPES:
            raise ValueError(f"data: URI type {media_type} is not one of {IMAGE_MEDIA_TYPES}")
        if ";base64" not in match["params"].lower():
            raise ValueError("a data: URI must be base64-encoded (;base64,)")
        payload = text[match.end() :]
    else:
        payload = text
    # Cheap bound before decoding: base64 is 4/3 of the bytes.
    if len(payload) > (MAX_INLINE_BYTES + 2) // 3 * 4 + 1024:
        raise ValueError(f"the image is larger than {MAX_INLINE_BYTES} bytes")
    data = _decode_base64(payload)
    if len(data) > MAX_INLINE_BYTES:
        raise ValueError(f"the image is larger than {MAX_INLINE_BYTES} bytes")
    if sniff(data) is None:
        raise ValueError("not a PNG, JPEG or WebP image")
    return ImageSource(kind="inline", data=data)


def _decode_base64(payload: str) -> bytes:
    if not _BASE64_CHARS.fullmatch(payload):
        raise ValueError("not valid base64")
    compact = "".join(payload.split())
    # The URL-safe alphabet is accepted too (clients built on it are common).
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


def image_digest(value: str) -> str:
    """A short stable name for the field's value (batch keys; never the bytes themselves)."""
    return hashlib.sha256(value.strip().encode()).hexdigest()[:16]
