"""What the worker may know about a sampler checkpoint without loading torch.

A checkpoint (`engine.checkpoint.SamplerState.to_bytes`) is a safetensors file whose metadata
holds one JSON header; this module reads that header (step, total, sampler, scheduler, the
request digest) and computes the digest of a request's parameters, so the worker can label
progress ("resumed from step k") and drop a checkpoint that is not its job's before handing
anything to the engine. It imports nothing of the model stack (import-linter).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from PIL import Image

from auraserve.core.request import GenerationRequest
from auraserve.errors import CheckpointMismatch

__all__ = ["CheckpointMismatch", "read_header", "request_digest"]

FORMAT_VERSION = 1
HEADER_KEY = "auraserve.checkpoint"

# Fields that change only how finished images are encoded, never the latents.
_OUTPUT_ONLY = frozenset({"output_format", "output_quality", "warnings"})


def read_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a checkpoint, without loading its tensors."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + length])["__metadata__"]
        header = json.loads(meta[HEADER_KEY])
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise CheckpointMismatch("not an auraserve sampler checkpoint") from exc
    if not isinstance(header, dict):
        raise CheckpointMismatch("not an auraserve sampler checkpoint")
    return header


def request_digest(request: GenerationRequest, init_image: Image.Image | None = None) -> str:
    """sha256 over a request's parameters and the pixels of its input image.

    Every request field that can change the latents is in (model, prompts, seed, size, steps,
    sampler, scheduler, shift, CFG, LoRAs, strength, exact…); output encoding is not. A
    checkpoint resumes only the request whose digest it carries.
    """
    digest = hashlib.sha256(f"auraserve-checkpoint-v{FORMAT_VERSION}".encode())
    fields = request.model_dump(mode="json", exclude=set(_OUTPUT_ONLY))
    digest.update(json.dumps(fields, sort_keys=True).encode())
    if init_image is None:
        digest.update(b"\0no-image")
    else:
        digest.update(f"\0{init_image.mode}:{init_image.width}x{init_image.height}\0".encode())
        digest.update(hashlib.sha256(init_image.tobytes()).digest())
    return digest.hexdigest()
