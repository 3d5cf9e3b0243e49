"""The input image of an image-to-image job: fetched, checked and decoded here, in the worker.

The API only checked the field's form (`core.image_input`); everything that needs the bytes
happens here, where a slow fetch or a hostile file costs one job and never the API:

* a URL is fetched through the webhooks' SSRF guard: the host is resolved once, *every* address
  must pass the same `AddressPolicy` as webhook deliveries (same operator allow list), and the
  connection is pinned to the checked addresses (`webhooks.delivery.PinnedNetworkBackend`), so
  DNS rebinding cannot move it; redirects are not followed; at most `MAX_FETCH_BYTES`, within
  `FETCH_TIMEOUT_SECONDS`, and only a PNG, JPEG or WebP content type;
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
from dataclasses import dataclass, field

import httpcore
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
from auraserve.webhooks.delivery import PinnedNetworkBackend, default_ssl_context
from auraserve.webhooks.ssrf import AddressPolicy, validate_webhook_url

FETCH_TIMEOUT_SECONDS = 15.0
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# A Python object's repr in a library's message (`<_io.BytesIO object at 0x7f…>`).
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class FetchPolicy:
    """Where and how much the worker may fetch; built from the webhook settings."""

    addresses: AddressPolicy = field(default_factory=AddressPolicy)
    allow_http: bool = False
    max_bytes: int = MAX_FETCH_BYTES
    timeout: float = FETCH_TIMEOUT_SECONDS


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


def load_inputs(jobs: Sequence[Job], policy: FetchPolicy) -> Inputs:
    """Load every job's input image once per distinct value (batch mates often share one)."""
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
                loaded[value] = load_image(value, policy)
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


def load_image(value: str, policy: FetchPolicy) -> Image.Image:
    """The field's image, decoded to RGB; `UnsupportedRequest` naming `image` otherwise."""
    try:
        source = parse_image(value)
    except ValueError as exc:
        raise UnsupportedRequest(f"image: {exc}") from None
    data = fetch(source.url, policy) if source.kind == "url" else source.data
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


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """GET `url` through the SSRF guard (see the module docstring); the body's bytes."""
    try:
        normalised = validate_webhook_url(
            url, allow_http=policy.allow_http, policy=policy.addresses
        )
    except InvalidParameter as exc:
        reason = exc.message.replace("The webhook URL", "the URL")
        raise UnsupportedRequest(f"image: {reason}") from None
    try:
        return asyncio.run(asyncio.wait_for(_get(normalised, policy), policy.timeout))
    except UnsupportedRequest:
        raise
    except BlockedAddress as exc:
        raise UnsupportedRequest(f"image: unreachable (blocked address: {exc.reason})") from None
    except TimeoutError:
        raise UnsupportedRequest(
            f"image: unreachable (no answer within {policy.timeout:g} s)"
        ) from None
    except socket.gaierror as exc:
        raise UnsupportedRequest(f"image: unreachable (DNS: {exc.strerror or exc})") from None
    except (httpcore.ConnectError, httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
        raise UnsupportedRequest(f"image: unreachable ({type(exc).__name__}: {exc})") from None


async def _get(url: str, policy: FetchPolicy) -> bytes:
    parsed = httpx.URL(url)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    # Resolved off the event loop; the connection goes only to these checked addresses.
    addresses = await asyncio.to_thread(policy.addresses.resolve_and_check, host, port)
    host_header = f"[{host}]" if ":" in host else host
    if parsed.port is not None:
        host_header += f":{parsed.port}"
    target = httpcore.URL(
        scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=parsed.raw_path
    )
    headers = [
        (b"Host", host_header.encode("ascii")),
        (b"User-Agent", b"auraserve-image-fetch"),
        (b"Accept", ", ".join(IMAGE_MEDIA_TYPES).encode("ascii")),
        (b"Connection", b"close"),
    ]
    async with (
        httpcore.AsyncConnectionPool(
            ssl_context=default_ssl_context() if parsed.scheme == "https" else None,
            max_connections=1,
            keepalive_expiry=0,
            retries=0,
            network_backend=PinnedNetworkBackend(host, addresses),
        ) as pool,
        pool.stream("GET", target, headers=headers) as response,
    ):
        status = response.status
        if 300 <= status < 400:
            raise UnsupportedRequest(f"image: unreachable (HTTP {status}; redirects are refused)")
        if status != 200:
            raise UnsupportedRequest(f"image: unreachable (HTTP {status})")
        media_type = (_header(response.headers, b"content-type") or "").split(";")[0]
        if media_type.strip().lower() not in IMAGE_MEDIA_TYPES:
            raise UnsupportedRequest(
                f"image: content type {media_type or 'missing'!r} is not one of "
                + ", ".join(IMAGE_MEDIA_TYPES)
            )
        length = _header(response.headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > policy.max_bytes:
            raise UnsupportedRequest(f"image: larger than {policy.max_bytes} bytes")
        body = bytearray()
        async for chunk in response.aiter_stream():
            body += chunk
            if len(body) > policy.max_bytes:
                raise UnsupportedRequest(f"image: larger than {policy.max_bytes} bytes")
    return bytes(body)


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


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
