"""Latent previews: the least-squares projection on the tiny VAE, and the encoded preview."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from diffusers import AuraFlowPipeline
from PIL import Image

from auraserve.engine.preview import (
    SDXL_PROJECTION,
    Projection,
    fit_projection,
    preview_image,
    preview_png,
)
from auraserve.engine.tiny import VAE_SCALING_FACTOR


def _smooth_latents(count: int, size: int, seed: int) -> torch.Tensor:
    """Engine-space latents with image-like spatial structure (bilinear-upsampled noise)."""
    coarse = torch.randn(count, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") * 2


def _decoded_on_grid(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's decode of one latent, clamped and averaged down to the latent grid, (h, w, 3)."""
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    pooled = torch.nn.functional.adaptive_avg_pool2d(image.clamp(-1, 1), latents.shape[-2:])
    return pooled[0].permute(1, 2, 0)


def test_fit_on_the_tiny_vae_beats_a_constant_on_unseen_latents(
    tiny_pipe: AuraFlowPipeline,
) -> None:
    vae = tiny_pipe.vae
    latents = _smooth_latents(12, 16, seed=0)
    train, held_out = latents[:8], latents[8:]
    projection = fit_projection(vae, train)
    assert len(projection.factors) == 4
    mean_colour = torch.stack([_decoded_on_grid(vae, x[None]) for x in train]).mean((0, 1, 2))
    fit_error = constant_error = 0.0
    for latent in held_out:
        target = _decoded_on_grid(vae, latent[None])
        fit_error += float(((projection.rgb(latent) - target) ** 2).mean())
        constant_error += float(((mean_colour - target) ** 2).mean())
    assert fit_error < 0.9 * constant_error


class _LinearVae(torch.nn.Module):
    """A decoder that IS a known per-pixel linear map (each latent pixel → an 8×8 patch)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=VAE_SCALING_FACTOR, shift_factor=None)
        self.weight, self.bias_ = weight, bias
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        engine_space = z * self.config.scaling_factor
        rgb = torch.einsum("nchw,cr->nrhw", engine_space, self.weight) + self.bias_.view(1, 3, 1, 1)
        return (torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest"),)


def test_fit_recovers_an_exactly_linear_decoder() -> None:
    """The fit's arithmetic (scaling, pooling, the solve) recovers factors it is built from —
    how the SDXL factors relate to the SDXL VAE."""
    weight = torch.tensor(SDXL_PROJECTION.factors)
    bias = torch.tensor(SDXL_PROJECTION.bias)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    projection = fit_projection(_LinearVae(weight, bias), latents)
    assert torch.allclose(torch.tensor(projection.factors), weight, atol=1e-5)
    assert torch.allclose(torch.tensor(projection.bias), bias, atol=1e-5)


def test_preview_is_a_small_image_of_the_projection() -> None:
    latents = torch.zeros(1, 4, 128, 64)
    latents[:, 0] = 2.0  # channel 0 is mostly luminance in SDXL's factors: a bright image
    png = preview_png(latents, size=256)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (128, 256)
    r, g, b = image.getpixel((10, 10))  # type: ignore[misc]
    expected = [
        (2 * f + c + 1) * 127.5
        for f, c in zip(SDXL_PROJECTION.factors[0], SDXL_PROJECTION.bias, strict=True)
    ]
    assert [abs(v - min(e, 255)) <= 1 for v, e in zip((r, g, b), expected, strict=True)] == [
        True
    ] * 3
    jpeg = Image.open(io.BytesIO(preview_png(latents[0], image_format="jpeg")))
    assert jpeg.format == "JPEG" and jpeg.size == (128, 256)
    # Never upscaled past the image's own size (8× the latent grid).
    assert preview_image(torch.zeros(4, 8, 8), size=1024).size == (64, 64)


def test_preview_refuses_what_it_cannot_show() -> None:
    with pytest.raises(ValueError, match="one image"):
        preview_png(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="expected"):
        preview_png(torch.zeros(16, 8, 8))
    with pytest.raises(ValueError, match="image_format"):
        preview_png(torch.zeros(4, 8, 8), image_format="gif")
    assert isinstance(SDXL_PROJECTION, Projection)
