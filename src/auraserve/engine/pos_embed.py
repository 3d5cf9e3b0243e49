"""Positional-embedding interpolation: sizes beyond the transformer's learned grid.

AuraFlow's patch embedding adds a learned square grid of positions (96² patches, 1536 px for
v0.3); diffusers raises for taller images and silently wraps for wider ones. Above the grid we
stretch it (ComfyUI's rule); inside it diffusers' own code runs, so results stay bit-identical.
"""

from __future__ import annotations

import types

import torch
from torch.nn.functional import interpolate

from auraserve.engine.components import AuraFlowPatchEmbed, AuraFlowPipeline

# Mode used to stretch the learned positional grid past its size; ComfyUI uses bilinear.
POS_EMBED_INTERPOLATION = "bilinear"


def _grid_side(patch_embed: AuraFlowPatchEmbed) -> int:
    return int(patch_embed.pos_embed_max_size**0.5)


def interpolated_pos_embed(
    patch_embed: AuraFlowPatchEmbed, h_p: int, w_p: int, dtype: torch.dtype
) -> torch.Tensor:
    """ComfyUI's rule: stretch the square grid to max(h, w) per side, then crop the centre."""
    grid = _grid_side(patch_embed)
    table = patch_embed.pos_embed[:, : grid * grid].float()
    dim = table.shape[-1]
    side = max(h_p, w_p)
    square = table.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    square = interpolate(square, size=(side, side), mode=POS_EMBED_INTERPOLATION)
    top, left = (side - h_p) // 2, (side - w_p) // 2
    crop = square[:, :, top : top + h_p, left : left + w_p]
    return crop.permute(0, 2, 3, 1).reshape(1, h_p * w_p, dim).to(dtype)


def _pos_embed_forward(self: AuraFlowPatchEmbed, latent: torch.Tensor) -> torch.Tensor:
    _, _, height, width = latent.shape
    h_p, w_p = height // self.patch_size, width // self.patch_size
    grid = _grid_side(self)
    if h_p <= grid and w_p <= grid:
        # Inside the learned grid: diffusers' own code, so results stay bit-identical.
        return AuraFlowPatchEmbed.forward(self, latent)
    batch, channels = latent.shape[:2]
    patches = latent.view(batch, channels, h_p, self.patch_size, w_p, self.patch_size)
    patches = patches.permute(0, 2, 4, 1, 3, 5).flatten(-3).flatten(1, 2)
    tokens = self.proj(patches)
    return tokens + interpolated_pos_embed(self, h_p, w_p, tokens.dtype)


def install_pos_embed_interpolation(pipe: AuraFlowPipeline) -> None:
    """Let the transformer take sizes beyond its learned grid (1536 px for v0.3).

    Replaces the patch-embed module's forward on this instance only. Must run before any
    accelerate offload hook wraps the module (hooks capture `forward` when installed).
    """
    patch_embed = pipe.transformer.pos_embed
    if getattr(patch_embed, "_auraserve_interpolates", False):
        return
    patch_embed.forward = types.MethodType(_pos_embed_forward, patch_embed)
    patch_embed._auraserve_interpolates = True


def max_grid_pixels(pipe: AuraFlowPipeline) -> int:
    """Largest side in pixels the learned positional grid covers without interpolation."""
    return (
        _grid_side(pipe.transformer.pos_embed)
        * pipe.transformer.config.patch_size
        * pipe.vae_scale_factor
    )


__all__ = [
    "POS_EMBED_INTERPOLATION",
    "install_pos_embed_interpolation",
    "interpolated_pos_embed",
    "max_grid_pixels",
]
