"""The `image` field at submit: what the API can judge without decoding anything.

`core.request.build_request` has already checked the field's form (and, for inline images,
the base64, the size and the format signature). A URL also gets the outbound guard's
submit-time check here (`Settings.outbound`, the policy webhooks use too): https only (http only
where AURASERVE_WEBHOOK_ALLOW_HTTP allows it), no credentials, no disguised numeric hosts, no
literal private or loopback address. Names are resolved only by the worker, right
before it connects to the addresses it checked (`worker.inputs`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from starlette.datastructures import UploadFile

from auraserve.config import Settings
from auraserve.core.image_input import ALLOWED, MAX_INLINE_BYTES, parse_image
from auraserve.core.request import GenerationRequest
from auraserve.errors import InvalidParameter


def check_image_url(
    request: GenerationRequest, settings: Settings, names: Mapping[str, str]
) -> None:
    """Refuse an image URL the worker would never be allowed to fetch (400 naming `image`)."""
    if request.image is None:
        return
    source = parse_image(request.image)
    if source.kind != "url":
        return
    public = names.get("image", "image")
    try:
        settings.outbound.check_url(source.url, field=public, noun="the URL")
    except InvalidParameter as exc:
        reason = exc.message.rstrip(".")
        raise InvalidParameter(
            field=public, message=f"{public}: {reason}", allowed=ALLOWED
        ) from None


async def upload_as_field(upload: UploadFile) -> str:
    """A form-data file part as the `image` field's base64 form; the body limit bounds it and
    `build_request` then checks it like any inline image (size, signature)."""
    data = await upload.read(MAX_INLINE_BYTES + 1)
    return base64.b64encode(data).decode("ascii")
