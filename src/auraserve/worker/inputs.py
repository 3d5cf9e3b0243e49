"""The input image of an image-to-image job: fetched, checked and decoded here, in the worker.

The API only checked the field's form (`core.image_input`); everything that needs the bytes
happens here, where a slow fetch or a hostile file costs one job and never the API:

* a URL is fetched through the outbound guard (`auraserve.outbound`), the one webhook deliveries
  use: the host is resolved once, *every* address must pass the process's `OutboundPolicy` (same
  operator allow list), and the connection is pinned to the checked addresses, so DNS rebinding
  cannot move it; redirects are not followed; at most `MAX_FETCH_BYTES`, within
  `FETCH_TIMEOUT_SECONDS` (`IMAGE_FETCH_LIMITS`), and only a PNG, JPEG or WebP content type;
* the bytes must be a PNG, JPEG or WebP whose canvas is at most `MAX_INPUT_PIXELS`, checked from
  the header before the pixels are allocated (decompression bombs);
* any failure ends that job FAILED with a message naming `image` (`UnsupportedRequest`: the
  client's request, not charged); the rest of the batch goes on.

When the request asked for the image's own size (`size_from_image`), `resolve_size` sets it
here, the only place that knows it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from auraserve.core.image_input import (
    IMAGE_MEDIA_TYPES,
    MAX_FETCH_BYTES,
    MAX_INPUT_PIXELS,
    parse_image,
    sniff,
)
from auraserve.core.jobs import Job
from auraserve.core.request import SIZE_MULTIPLE, GenerationRequest, bounds
from auraserve.errors import BlockedAddress, InvalidParameter, UnsupportedRequest
from auraserve.outbound import OutboundLimits, OutboundPolicy
from auraserve.outbound.transport import OutboundCall, read_capped

FETCH_TIMEOUT_SECONDS = 15.0
IMAGE_FETCH_LIMITS = OutboundLimits(
    # The whole fetch is bounded; a connect may take all of it (the fetch has no other step).
    total=FETCH_TIMEOUT_SECONDS,
    connect=FETCH_TIMEOUT_SECONDS,
    max_body_bytes=MAX_FETCH_BYTES,
)
USER_AGENT = "auraserve-image-fetch"
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# A Python object's repr in a library's message (`<_io.BytesIO object at 0x7f…>`).
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


@dataclass
class Inputs:
    """A claimed batch after loading its images: the jobs that go on (with sizes resolved),
    their decoded inputs (None for text-to-image) and the jobs that failed, with why."""

    jobs: list[Job]
    images: list[Image.Image | None]
    failed: list[tuple[Job, str]]

    @property
    def any_image(self) -> bool:
        return any(image is not None for image in self.images)


def load_inputs(
    jobs: Sequence[Job], policy: OutboundPolicy, limits: OutboundLimits = IMAGE_FETCH_LIMITS
) -> Inputs:
    """Load every job's input image once per distinct value (batch mates often share one);
    URLs are fetched under ``policy``, the process's outbound policy (`Settings.outbound`)."""
    loaded: dict[str, Image.Image | str] = {}
    inputs = Inputs(jobs=[], images=[], failed=[])
    for job in jobs:
        value = job.request.image
        if value is None:
            inputs.jobs.append(job)
            inputs.images.append(None)
            continue
        if value not in loaded:
            try:
                loaded[value] = load_image(value, policy, limits)
            except UnsupportedRequest as exc:
                loaded[value] = exc.message
        outcome = loaded[value]
        if isinstance(outcome, str):
            inputs.failed.append((job, outcome))
            continue
        request = resolve_size(job.request, outcome)
        inputs.jobs.append(dataclasses.replace(job, request=request))
        inputs.images.append(outcome)
    return inputs


def load_image(
    value: str, policy: OutboundPolicy, limits: OutboundLimits = IMAGE_FETCH_LIMITS
) -> Image.Image:
    """The field's image, decoded to RGB; `UnsupportedRequest` naming `image` otherwise."""
    try:
        source = parse_image(value)
    except ValueError as exc:
        raise UnsupportedRequest(f"image: {exc}") from None
    data = fetch(source.url, policy, limits) if source.kind == "url" else source.data
    return decode(data)


def decode(data: bytes) -> Image.Image:
    """PNG, JPEG or WebP bytes to an upright RGB image, refusing huge canvases unread."""
    if sniff(data) is None:
        raise UnsupportedRequest("image: not a PNG, JPEG or WebP image")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format not in _FORMATS:
                raise UnsupportedRequest("image: not a PNG, JPEG or WebP image")
            width, height = opened.size
            if width * height > MAX_INPUT_PIXELS:
                raise UnsupportedRequest(
                    f"image: {width}×{height} is more than {MAX_INPUT_PIXELS} pixels"
                )
            opened.seek(0)  # the first frame of an animation
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except UnsupportedRequest:
        raise
    except UnidentifiedImageError:
        # PIL's message names its in-memory file object, address included: nothing a client
        # can use (and a process detail it should not see).
        raise UnsupportedRequest(
            "image: could not be decoded (not a readable PNG, JPEG or WebP image)"
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = _OBJECT_REPR.sub("the image", str(exc))
        raise UnsupportedRequest(f"image: could not be decoded ({reason})") from None
    return image


def fetch(url: str, policy: OutboundPolicy, limits: OutboundLimits = IMAGE_FETCH_LIMITS) -> bytes:
    """GET `url` through the outbound guard (see the module docstring); the body's bytes."""
    try:
        normalised = policy.check_url(url, field="image", noun="the URL")
    except InvalidParameter as exc:
        raise UnsupportedRequest(f"image: {exc.message}") from None
    try:
        return asyncio.run(_get(normalised, policy, limits))
    except UnsupportedRequest:
        raise
    except BlockedAddress as exc:
        raise UnsupportedRequest(f"image: unreachable (blocked address: {exc.reason})") from None
    except TimeoutError:
        raise UnsupportedRequest(
            f"image: unreachable (no answer within {limits.total:g} s)"
        ) from None
    except socket.gaierror as exc:
        raise UnsupportedRequest(f"image: unreachable (DNS: {exc.strerror or exc})") from None
    except (httpx.TransportError, OSError) as exc:
        raise UnsupportedRequest(f"image: unreachable ({type(exc).__name__}: {exc})") from None


async def _get(url: str, policy: OutboundPolicy, limits: OutboundLimits) -> bytes:
    headers = {"User-Agent": USER_AGENT, "Accept": ", ".join(IMAGE_MEDIA_TYPES)}
    call = OutboundCall(policy, limits)
    async with call.stream("GET", url, headers=headers) as response:
        status = response.status_code
        if 300 <= status < 400:
            raise UnsupportedRequest(f"image: unreachable (HTTP {status}; redirects are refused)")
        if status != 200:
            raise UnsupportedRequest(f"image: unreachable (HTTP {status})")
        media_type = response.headers.get("content-type", "").split(";")[0]
        if media_type.strip().lower() not in IMAGE_MEDIA_TYPES:
            raise UnsupportedRequest(
                f"image: content type {media_type or 'missing'!r} is not one of "
                + ", ".join(IMAGE_MEDIA_TYPES)
            )
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            raise UnsupportedRequest(f"image: larger than {limits.max_body_bytes} bytes")
        body, more = await read_capped(response, limits.max_body_bytes)
        if more:
            raise UnsupportedRequest(f"image: larger than {limits.max_body_bytes} bytes")
    return body


def resolve_size(request: GenerationRequest, image: Image.Image) -> GenerationRequest:
    """The request with the image's size when it asked for that (`size_from_image`).

    The size keeps the image's aspect ratio within the pixels of the request's width × height
    (the size it was priced at, so the output never costs more than was reserved), scaled up
    to the 512 px minimum side if needed, rounded to a multiple of 16 and kept in 512–2048 like
    any size. Where the minimum side and the priced pixels cannot both hold (a long, thin
    image), the long side is shortened: the ratio gives way, never the price."""
    if not request.size_from_image:
        return request
    low, high = bounds("width")
    budget = request.width * request.height
    width, height = image.size
    scale = min(1.0, math.sqrt(budget / (width * height)))
    if min(width, height) * scale < low:
        scale = low / min(width, height)
    sizes = [
        min(high, max(low, math.floor(side * scale / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE))
        for side in (width, height)
    ]
    if sizes[0] * sizes[1] > budget:
        long = 0 if sizes[0] >= sizes[1] else 1
        short = sizes[1 - long]
        sizes[long] = max(low, budget // short // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return request.model_copy(update={"width": sizes[0], "height": sizes[1]})
