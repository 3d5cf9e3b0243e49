"""Image encoding: formats, quality, and generation parameters that survive a round trip."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from auraserve.core.request import GenerationRequest
from auraserve.media.encode import (
    encode_image,
    generation_metadata,
    parameters_text,
    parse_parameters_text,
    png_compress_level,
    read_parameters,
)

METADATA: dict[str, Any] = {
    "prompt": 'a cat holding a sign that says "hello, world"\nsecond line ☃',
    "negative_prompt": "blurry, low quality",
    "steps": 25,
    "sampler": "dpmpp_2m",
    "scheduler": "karras",
    "guidance_scale": 3.5,
    "seed": 2**53 - 1,
    "width": 1024,
    "height": 768,
    "model": "auraflow-v0-3",
    "shift": 1.73,
}


def _image(size: int = 256) -> Image.Image:
    """A smooth image with some texture, closer to a photo than noise or a flat colour."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [128 + 100 * np.sin(6 * x + 3 * y), 128 + 80 * np.cos(20 * x * y), 255 * x]
    pixels = np.stack(channels, -1) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_metadata_round_trip(fmt: str) -> None:
    data = encode_image(_image(), fmt, 80, METADATA)
    assert Image.open(io.BytesIO(data)).format == fmt.upper()
    assert read_parameters(data) == METADATA


def test_png_carries_a1111_text_and_json() -> None:
    image = Image.open(io.BytesIO(encode_image(_image(), "png", 80, METADATA)))
    assert image.info["parameters"] == parameters_text(METADATA)
    assert '"seed":9007199254740991' in image.info["auraserve"]
    # A reader that only knows A1111's text gets the same parameters back.
    assert parse_parameters_text(image.info["parameters"]) == METADATA


def test_a1111_text_format() -> None:
    simple = {**METADATA, "prompt": "a cat", "seed": 42}
    assert parameters_text(simple) == (
        "a cat\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 25, Sampler: dpmpp_2m, Schedule type: karras, CFG scale: 3.5, Seed: 42, "
        "Size: 1024x768, Model: auraflow-v0-3, Shift: 1.73"
    )


def test_webp_exif_user_comment_alone_is_enough() -> None:
    data = encode_image(_image(), "webp", 80, METADATA)
    exif = Image.open(io.BytesIO(data)).getexif().get_ifd(0x8769)
    comment = exif[0x9286]
    assert comment.startswith(b"UNICODE\x00")
    text = comment[8:].decode("utf-16-be")
    assert parse_parameters_text(text) == METADATA
    # Strip the XMP copy: the EXIF copy still reproduces the parameters.
    image = Image.open(io.BytesIO(data))
    stripped = io.BytesIO()
    image.save(stripped, format="WEBP", exif=image.info["exif"])
    assert read_parameters(stripped.getvalue()) == METADATA


def test_no_metadata_and_foreign_files() -> None:
    assert read_parameters(encode_image(_image(), "png", 80, None)) is None
    assert read_parameters(encode_image(_image(), "webp", 80, None)) is None
    assert read_parameters(b"not an image") is None


def test_jpeg_quality_changes_size_and_fidelity() -> None:
    image = _image(256)
    original = np.asarray(image, dtype=np.float64)
    errors, sizes = [], []
    for quality in (10, 50, 95):
        data = encode_image(image, "jpeg", quality, None)
        decoded = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)
        errors.append(np.abs(decoded - original).mean())
        sizes.append(len(data))
    assert sizes[0] < sizes[1] < sizes[2]
    assert errors[0] > errors[1] > errors[2]
    assert encode_image(image, "jpeg", 0, None)  # 0 is clamped to JPEG's 1


def test_png_is_lossless_and_quality_only_sets_effort() -> None:
    image = _image(256)
    low, high = encode_image(image, "png", 0, None), encode_image(image, "png", 100, None)
    for data in (low, high):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))
    assert len(high) <= len(low)
    assert [png_compress_level(q) for q in (0, 24, 25, 50, 80, 100)] == [1, 1, 2, 3, 4, 4]


def test_png_encode_is_fast() -> None:
    image = _image(1024)
    started = time.perf_counter()
    encode_image(image, "png", 80, METADATA)
    assert time.perf_counter() - started < 2.0  # ≈ 0.2 s on one core; generous for CI


def test_rgba_and_unknown_formats() -> None:
    rgba = _image(64).convert("RGBA")
    assert Image.open(io.BytesIO(encode_image(rgba, "jpg", 80, None))).mode == "RGB"
    with pytest.raises(ValueError, match="png, webp or jpeg"):
        encode_image(rgba, "gif", 80, None)


def test_generation_metadata_from_a_request() -> None:
    request = GenerationRequest(
        model="auraflow-v0-3",
        prompt="a fox",
        guidance_scale=3.5,
        steps=20,
        width=1024,
        height=1024,
        seed=7,
        shift=1.73,
        sampler="euler",
        scheduler="normal",
        output_format="png",
        output_quality=80,
        num_images=2,
    )
    meta = generation_metadata(request, seed=8, prompt_used="a fox, golden hour")
    assert meta["seed"] == 8 and meta["prompt"] == "a fox, golden hour"
    assert meta["original_prompt"] == "a fox"
    assert read_parameters(encode_image(_image(64), "webp", 80, meta)) == meta
    assert "original_prompt" not in generation_metadata(request, seed=7)
