"""Which request fields may differ inside one batch: the cases that tests/core/test_request.py
holds the batch key to, and tests/engine/test_pipeline.py holds the engine to.

Every field of GenerationRequest is in exactly one table, so a new field fails the coverage
test until someone decides whether the engine reads it per row or once per batch."""

from __future__ import annotations

from typing import Any

from auraserve.core.lora import LoraSpec
from auraserve.core.request import GenerationRequest

IMAGE_URL = "https://example.com/a.png"

#: The engine reads these per request (row): requests differing only here share a batch.
PER_ROW: dict[str, Any] = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "dark",
    "num_images": 2,
    "guidance_scale": 7.0,
    "seed": 99,
    "output_format": "webp",
    "output_quality": 10,
    "expand_prompt": True,
    "warnings": ("width was rounded",),
}

#: The engine reads these once per batch (from its first request): they are in the key.
PER_BATCH: dict[str, Any] = {
    "model": "another-model",
    "steps": 4,
    "width": 80,
    "height": 80,
    "shift": 3.0,
    "sampler": "heun",
    "scheduler": "karras",
    "exact": True,
    "loras": (LoraSpec(name="style", scale=0.5),),
    "image": IMAGE_URL,  # text-to-image and image-to-image never mix
}

#: Only with an input image: the start step (strength), and a size taken from the image.
PER_BATCH_WITH_IMAGE: dict[str, Any] = {
    "strength": 0.5,
    "size_from_image": True,
}


def changed(request: GenerationRequest, **fields: Any) -> GenerationRequest:
    """`request` with `fields` replaced, unvalidated (engine tests use sizes below 512)."""
    return GenerationRequest.model_construct(**{**dict(request), **fields})
