"""The `image` and `strength` fields in the canonical request: forms, defaults, batch key, price."""

from __future__ import annotations

import base64

import pytest

from auraserve.core.image_input import MAX_INLINE_BYTES, parse_image, sniff, steps_to_run
from auraserve.core.presets import default_presets
from auraserve.core.request import GenerationRequest, build_request
from auraserve.errors import InvalidParameter

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
PRESET = default_presets()["auraflow-v0-3"]


def _build(**fields: object) -> GenerationRequest:
    return build_request({"prompt": "p", **fields}, model="auraflow-v0-3", preset=PRESET)


def test_forms() -> None:
    b64 = base64.b64encode(PNG).decode()
    assert parse_image(f"data:image/png;base64,{b64}").data == PNG
    assert parse_image(b64).data == PNG
    assert parse_image(base64.urlsafe_b64encode(PNG).decode().rstrip("=")).data == PNG
    assert parse_image("https://example.com/a.png").kind == "url"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff(b"\xff\xd8\xff\xe0") == "image/jpeg"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "must not be empty"),
        ("ftp://example.com/a.png", "https://"),
        ("data:image/png,abc", "base64"),
        ("data:image/gif;base64,R0lG", "is not one of"),
        ("data:image/png;base64,@@@", "not valid base64"),
        (base64.b64encode(b"hello").decode(), "not a PNG, JPEG or WebP"),
        (base64.b64encode(PNG + b"0" * MAX_INLINE_BYTES).decode(), "larger than"),
        ("https://example.com/" + "a" * 2048, "longer than 2048"),
    ],
)
def test_bad_forms_name_the_field(value: str, says: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        _build(image=value)
    assert caught.value.field == "image"
    assert caught.value.message.startswith("image: ") and says in caught.value.message


def test_defaults_and_size_rule() -> None:
    plain = _build()
    assert plain.image is None and plain.strength == 1.0 and not plain.size_from_image
    img = _build(image="https://example.com/a.png")
    assert img.strength == 0.8 and img.size_from_image
    assert (img.width, img.height) == (1024, 1024)  # the priced size
    sized = _build(image="https://example.com/a.png", width=768, strength=0.3)
    assert not sized.size_from_image and sized.strength == 0.3
    # A client cannot claim the derived flag.
    claimed = _build(image="https://example.com/a.png", width=768, size_from_image=True)
    assert not claimed.size_from_image


def test_strength_needs_an_image_and_a_range() -> None:
    for fields in ({"strength": 0.5}, {"image": "https://e.com/a.png", "strength": 1.01}):
        with pytest.raises(InvalidParameter) as caught:
            _build(**fields)
        assert caught.value.field == "strength"


def test_batch_key_separates_what_changes_the_computation() -> None:
    url = "https://example.com/a.png"
    plain = _build(seed=1)
    assert "img" not in plain.batch_key
    a = _build(image=url, strength=0.5, width=1024, height=1024, seed=1)
    b = _build(image="https://example.com/b.png", strength=0.5, width=1024, height=1024, seed=2)
    assert a.batch_key == b.batch_key != plain.batch_key  # given sizes: any images batch
    assert a.batch_key != _build(image=url, strength=0.6, width=1024, height=1024).batch_key
    # Sizes from the image: only the same image.
    assert _build(image=url).batch_key == _build(image=url, seed=9).batch_key
    assert _build(image=url).batch_key != _build(image="https://example.com/b.png").batch_key


@pytest.mark.parametrize(("strength", "steps"), [(1.0, 25), (0.6, 15), (0.5, 13), (0.0, 1)])
def test_price_counts_the_steps_run(strength: float, steps: int) -> None:
    request = _build(image="https://example.com/a.png", strength=strength, steps=25)
    assert request.priced_steps == steps
    assert request.price(PRESET) == _build(steps=steps).price(PRESET)
    assert steps_to_run(25, strength) == (steps if strength else 0)
