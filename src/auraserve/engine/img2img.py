"""Image-to-image: the input image's latents and the point of the schedule sampling starts from.

Flow matching interpolates linearly between data and noise, x_σ = σ·noise + (1−σ)·x0, so
starting part-way down a schedule needs no special sampler: encode the input to x0, cut the
schedule, and place x0 at the cut's σ with the image's own seeded noise. The rules:

* ``strength`` s runs ``round_half_up(n·s)`` of the schedule's n steps — its *last* ones (as
  diffusers' image-to-image pipelines do), so the start σ is the one those steps start from;
* s = 1 keeps the whole schedule: x = σ_max·noise + (1−σ_max)·x0, and every schedule here
  starts at σ_max = 1, so the input's weight is exactly 0 and the result is text-to-image with
  the same seed, bit for bit;
* s = 0 runs no step: the result is decode(encode(input)), the VAE round trip;
* the latent is the VAE posterior's mode (its mean), not a sample: the same input always gives
  the same x0, so a seed means one image, as it does for text-to-image;
* each image is encoded on its own (batch 1), like decoding, so a batch never changes it.
"""

from __future__ import annotations

import torch
from PIL import Image

from auraserve.core.image_input import steps_to_run
from auraserve.engine.components import AuraFlowPipeline


def start_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of `sigmas` (n steps = n+1 values, ending at 0) that `strength` runs."""
    total = len(sigmas) - 1
    return sigmas[total - steps_to_run(total, strength) :]


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = σ·noise + (1−σ)·x0: the input placed at the start of the cut schedule."""
    sigma = sigma.to(noise.device, noise.dtype)
    return sigma * noise + (1 - sigma) * x0.to(noise.device, noise.dtype)


@torch.inference_mode()
def encode_image(
    pipe: AuraFlowPipeline, image: Image.Image, width: int, height: int
) -> torch.Tensor:
    """The latent (1, C, height/8, width/8), float32, of `image` resized to width × height,
    in the space the transformer works in (the inverse of the engine's decode scaling)."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image.convert("RGB"), height=height, width=width)
    posterior = vae.encode(pixels.to(pipe._execution_device, vae.dtype)).latent_dist
    latent = posterior.mode().float()
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latent = latent - shift
    result: torch.Tensor = latent * vae.config.scaling_factor
    return result
