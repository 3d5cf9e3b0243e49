"""Live previews: latents projected straight to RGB by a 4→3 linear map, no VAE decode.

AuraFlow uses SDXL's VAE (4 latent channels, 8× downsampling, ``scaling_factor`` 0.13025,
see `engine.tiny` and the model's ``vae/config.json``), and the engine's latents are the
VAE's latents times that factor (`AuraFlowEngine._decode_one` divides it out) — the same
space ComfyUI's samplers work in. So ComfyUI's published SDXL preview factors apply as they
are: ``comfy/latent_formats.py``, class ``SDXL``, ``latent_rgb_factors`` (4×3) and
``latent_rgb_factors_bias``, which map one latent pixel to an RGB value in [−1, 1] for the
8×8 image patch above it (ComfyUI's ``Latent2RGBPreviewer``).

A projection like this is a least-squares fit of the decoded image, averaged down to the
latent grid, on the latents: `fit_projection` is that fit, for any VAE (it is how a
projection for another VAE, or the tiny test VAE, is obtained, and how the published factors
can be checked against the real SDXL VAE). The preview of a 1024² image (128×128 latents) costs
a (16384×4)·(4×3) product and a small PNG encode: milliseconds on a CPU (bench/preview.py).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Projection:
    """rgb = latent·factors + bias per latent pixel, rgb in [−1, 1]."""

    factors: tuple[tuple[float, float, float], ...]  # one (R, G, B) row per latent channel
    bias: tuple[float, float, float]

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(C, h, w) or (1, C, h, w) latents → (h, w, 3) float32 RGB in [−1, 1] (unclamped)."""
        if latents.ndim == 4:
            if latents.shape[0] != 1:
                raise ValueError("one image at a time: pass latents[i]")
            latents = latents[0]
        if latents.ndim != 3 or latents.shape[0] != len(self.factors):
            raise ValueError(
                f"expected ({len(self.factors)}, h, w) latents, got {tuple(latents.shape)}"
            )
        weight = torch.tensor(self.factors, dtype=torch.float32, device=latents.device)
        bias = torch.tensor(self.bias, dtype=torch.float32, device=latents.device)
        c, h, w = latents.shape
        # (3, C)·(C, h·w): one small contiguous matmul (a channels-last linear is 10× slower)
        rgb = torch.addmm(bias[:, None], weight.T, latents.float().reshape(c, h * w))
        return rgb.reshape(3, h, w).permute(1, 2, 0)


#: ComfyUI ``comfy/latent_formats.py`` ``SDXL.latent_rgb_factors`` / ``_bias`` (published
#: preview factors for the SDXL VAE, which AuraFlow uses).
SDXL_PROJECTION = Projection(
    factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    bias=(0.1084, -0.0175, -0.0011),
)


def preview_image(
    latents: torch.Tensor, *, size: int = 256, projection: Projection = SDXL_PROJECTION
) -> Image.Image:
    """An RGB preview whose longer side is at most ``size`` px (never upscaled past 8× the
    latent grid, the image's own size)."""
    rgb = projection.rgb(latents.detach()).cpu().numpy()
    # numpy, not torch, for the per-pixel arithmetic: torch splits even these ~50k values over
    # its thread pool, and on a busy host the hand-offs cost 10-30× the work (bench/preview.py)
    pixels = np.rint((np.clip(rgb, -1, 1) + 1) * 127.5).astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    h, w = pixels.shape[:2]
    scale = min(size / max(h, w), 8.0)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    if target != (w, h):
        image = image.resize(target, Image.Resampling.BILINEAR)
    return image


def preview_png(
    latents: torch.Tensor,
    *,
    size: int = 256,
    projection: Projection = SDXL_PROJECTION,
    image_format: str = "png",
    quality: int = 80,
) -> bytes:
    """`preview_image` encoded as PNG (default; fast compression) or JPEG (``quality``)."""
    image = preview_image(latents, size=size, projection=projection)
    out = io.BytesIO()
    if image_format == "png":
        image.save(out, format="PNG", compress_level=1)
    elif image_format == "jpeg":
        image.save(out, format="JPEG", quality=quality)
    else:
        raise ValueError(f"image_format must be 'png' or 'jpeg', not {image_format!r}")
    return out.getvalue()


@torch.no_grad()
def fit_projection(vae: Any, samples: torch.Tensor | Sequence[torch.Tensor]) -> Projection:
    """Least-squares factors and bias from engine-space latents to ``vae``'s decode.

    ``samples``: (N, C, h, w) latents in the engine's space (VAE latent × scaling factor).
    Each is decoded exactly as the engine decodes, clamped to [−1, 1], averaged down to the
    latent grid, and [latent, 1] → RGB is solved over every latent pixel in float64.
    """
    batch = samples if isinstance(samples, torch.Tensor) else torch.cat(list(samples))
    xs, ys = [], []
    for latent in batch.split(1):
        scaled = latent.float() / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            scaled = scaled + shift
        image = vae.decode(scaled.to(vae.device, vae.dtype), return_dict=False)[0]
        image = image.float().clamp(-1, 1).cpu()
        target = torch.nn.functional.adaptive_avg_pool2d(image, latent.shape[-2:])
        xs.append(latent.float().cpu()[0].flatten(1).T)  # (h·w, C)
        ys.append(target[0].flatten(1).T)  # (h·w, 3)
    x = torch.cat(xs).double()
    y = torch.cat(ys).double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # (C + 1, 3)
    rows = solution.tolist()
    factors = tuple((float(r[0]), float(r[1]), float(r[2])) for r in rows[:-1])
    bias = (float(rows[-1][0]), float(rows[-1][1]), float(rows[-1][2]))
    return Projection(factors=factors, bias=bias)
