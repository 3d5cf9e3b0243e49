"""The worker's side of image-to-image: fetching through the outbound guard, limits, decoding,
sizes taken from the image, and a bad image failing only its own job, uncharged."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from PIL import Image

from auraserve.config import Settings
from auraserve.core.image_input import MAX_FETCH_BYTES
from auraserve.core.jobs import JobStatus
from auraserve.core.request import GenerationRequest, build_request
from auraserve.errors import UnsupportedRequest
from auraserve.outbound import OutboundLimits, OutboundPolicy
from auraserve.runtime import Runtime
from auraserve.store import keys, ledger
from auraserve.worker.inputs import (
    FETCH_TIMEOUT_SECONDS,
    IMAGE_FETCH_LIMITS,
    decode,
    fetch,
    load_image,
    resolve_size,
)
from tests.store_jobs import submit_one
from tests.worker.test_worker import MODEL, _wait


def _png(width: int = 40, height: int = 24, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color=1 if mode == "1" else (10, 200, 30)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, str, bytes, dict[str, str]]]] = {}

    def do_GET(self) -> None:
        status, media_type, body, headers = self.routes.get(
            self.path, (404, "text/plain", b"no", {})
        )
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    _Handler.routes = {
        "/cat.png": (200, "image/png", _png(), {}),
        "/cat.txt": (200, "text/html", _png(), {}),
        "/big.png": (200, "image/png", b"\x89PNG\r\n\x1a\n" + b"0" * 5000, {}),
        "/moved.png": (302, "text/plain", b"", {"Location": "http://169.254.169.254/"}),
        "/junk.png": (200, "image/png", b"<html>not an image</html>", {}),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


LOCAL = OutboundPolicy.from_allow_list(["127.0.0.1"], allow_http=True)
SMALL = OutboundLimits(total=15.0, connect=15.0, max_body_bytes=4096)


def test_image_fetch_limits_keep_their_values() -> None:
    assert IMAGE_FETCH_LIMITS.total == IMAGE_FETCH_LIMITS.connect == FETCH_TIMEOUT_SECONDS == 15
    assert IMAGE_FETCH_LIMITS.max_body_bytes == MAX_FETCH_BYTES


def test_a_url_is_fetched_and_decoded(origin: str) -> None:
    image = load_image(f"{origin}/cat.png", LOCAL, SMALL)
    assert image.size == (40, 24) and image.mode == "RGB"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/cat.txt", "content type 'text/html'"),
        ("/big.png", "larger than 4096 bytes"),
        ("/moved.png", "redirects are refused"),
        ("/missing.png", "unreachable (HTTP 404)"),
        ("/junk.png", "not a PNG, JPEG or WebP"),
    ],
)
def test_fetch_limits_fail_with_a_message_naming_image(origin: str, path: str, reason: str) -> None:
    with pytest.raises(UnsupportedRequest, match=r"^image: ") as caught:
        load_image(f"{origin}{path}", LOCAL, SMALL)
    assert reason in caught.value.message


def test_the_ssrf_guard_refuses_loopback_unless_allowed(origin: str) -> None:
    with pytest.raises(UnsupportedRequest, match=r"image: .*disallowed address"):
        fetch(f"{origin}/cat.png", OutboundPolicy(allow_http=True))
    with pytest.raises(UnsupportedRequest, match=r"image: .*https"):
        fetch(f"{origin}/cat.png", OutboundPolicy.from_allow_list(["127.0.0.1"]))


def test_a_name_resolving_to_a_private_address_is_refused_at_connect_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    def private(*_: Any, **__: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", private)
    with pytest.raises(UnsupportedRequest, match="image: unreachable \\(blocked address"):
        fetch("https://images.example.com/cat.png", OutboundPolicy())


def test_an_unreachable_host_fails_the_job_not_the_worker() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(UnsupportedRequest, match="image: unreachable"):
        fetch(f"http://127.0.0.1:{port}/x.png", LOCAL, SMALL)


def test_decompression_bombs_are_refused_before_decoding() -> None:
    with pytest.raises(UnsupportedRequest, match="more than 16777216 pixels"):
        decode(_png(4097, 4097, mode="1"))


def test_inline_images_decode_without_any_fetch() -> None:
    assert load_image(_data_uri(_png(17, 9)), OutboundPolicy()).size == (17, 9)


def _request(**fields: Any) -> GenerationRequest:
    settings = Settings()
    preset = settings.presets[settings.default_preset]
    return build_request(
        {"prompt": "p", "image": _data_uri(_png()), **fields},
        model=settings.default_preset,
        preset=preset,
    )


@pytest.mark.parametrize(
    ("size", "given", "expected"),
    [
        ((800, 600), {}, (800, 608)),  # within the priced pixels: the image's own size
        ((3000, 2000), {}, (1248, 832)),  # scaled down to the priced 1024² pixels
        ((300, 200), {}, (768, 512)),  # scaled up to the 512 px minimum side
        ((4000, 200), {}, (2048, 512)),  # too thin: the long side gives way, not the price
        ((800, 600), {"width": 1024, "height": 512}, (1024, 512)),  # given sizes win
    ],
)
def test_the_output_size_follows_the_input_within_the_priced_pixels(
    size: tuple[int, int], given: dict[str, int], expected: tuple[int, int]
) -> None:
    request = _request(**given)
    assert request.size_from_image is (not given)
    resolved = resolve_size(request, Image.new("RGB", size))
    assert (resolved.width, resolved.height) == expected
    assert resolved.width * resolved.height <= request.width * request.height


def test_a_bad_image_fails_its_own_job_uncharged_and_the_batch_goes_on(
    settings: Settings, tiny_engine: Any
) -> None:
    rt = Runtime.open(settings, engine=tiny_engine)
    try:
        account = keys.create_account(rt.db, "t", credits=1000)
        preset = rt.settings.presets[MODEL]

        def submit(**fields: Any) -> str:
            req = build_request(
                {"prompt": "w", "steps": 2, "strength": 0.5, **fields},
                model=MODEL,
                preset=preset,
            )
            return submit_one(
                rt.db,
                account_id=account.account_id,
                request=req,
                price=req.price(preset),
                max_queued=100,
                max_attempts=3,
            ).job.id

        # Same batch key (same size and strength): claimed together, judged apart.
        good = submit(image=_data_uri(_png()), width=512, height=512)
        bad = submit(image="https://127.0.0.1/cat.png", width=512, height=512)
        rt.start_worker()
        done, failed = _wait(rt, good), _wait(rt, bad)
        assert done.status is JobStatus.COMPLETED, done.error
        assert failed.status is JobStatus.FAILED
        assert failed.error.startswith("image: ") and "disallowed address" in failed.error
        spent = done.request.price(preset)
        assert ledger.balance(rt.db, account.account_id) == 1000 - spent
    finally:
        rt.close()


def test_a_size_from_the_image_reaches_the_stored_output(
    settings: Settings, tiny_engine: Any
) -> None:
    rt = Runtime.open(settings, engine=tiny_engine)
    try:
        account = keys.create_account(rt.db, "t", credits=1000)
        preset = rt.settings.presets[MODEL]
        req = build_request(
            {"prompt": "w", "steps": 2, "image": _data_uri(_png(200, 100))},
            model=MODEL,
            preset=preset,
        )
        job_id = submit_one(
            rt.db,
            account_id=account.account_id,
            request=req,
            price=req.price(preset),
            max_queued=100,
            max_attempts=3,
        ).job.id
        rt.start_worker()
        job = _wait(rt, job_id)
        assert job.status is JobStatus.COMPLETED, job.error
        # 512² priced: a 2:1 input keeps its 512 px short side and gives way on the long one.
        assert (job.output["width"], job.output["height"]) == (512, 512)
    finally:
        rt.close()


def test_an_undecodable_image_says_so_without_a_memory_address() -> None:
    """PIL names its in-memory file object (`<_io.BytesIO object at 0x…>`): that never reaches
    the job's error."""
    broken = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # the signature, then nothing a PNG holds
    with pytest.raises(UnsupportedRequest) as caught:
        decode(broken)
    message = str(caught.value)
    assert message.startswith("image: could not be decoded")
    assert "0x" not in message and "object at" not in message, message
