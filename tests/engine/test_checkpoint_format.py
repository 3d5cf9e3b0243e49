"""The torch-free side of checkpoints: the request digest."""

from __future__ import annotations

from PIL import Image

from auraserve.engine.checkpoint_format import request_digest
from tests.engine.conftest import make_request


def test_digest_covers_what_changes_the_latents_and_nothing_else() -> None:
    digest = request_digest(make_request())
    assert request_digest(make_request()) == digest
    for change in (
        {"seed": 1},
        {"prompt": "a dog"},
        {"negative_prompt": ""},
        {"guidance_scale": 2.0},
        {"steps": 4},
        {"sampler": "heun"},
        {"scheduler": "karras"},
        {"shift": 3.0},
        {"width": 768},
        {"num_images": 2},
    ):
        assert request_digest(make_request(**change)) != digest, change
    # Output encoding never changes the latents: a checkpoint still resumes.
    assert request_digest(make_request(output_format="jpeg", output_quality=50)) == digest


def test_digest_covers_the_input_image_pixels() -> None:
    request = make_request()
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    assert request_digest(request, red) == request_digest(request, red.copy())
    assert request_digest(request, red) != request_digest(request, blue)
    assert request_digest(request, red) != request_digest(request, None)
