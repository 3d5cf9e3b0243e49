"""Positional-grid interpolation: continuous at the grid's edge, diffusers' code inside it.

(The engine above the grid, where diffusers crashes: tests/engine/test_pipeline.py.)"""

from __future__ import annotations

import torch
from diffusers.models.transformers.auraflow_transformer_2d import AuraFlowPatchEmbed

from auraserve.engine.pipeline import AuraFlowEngine
from auraserve.engine.pos_embed import interpolated_pos_embed


def test_interpolation_is_continuous_at_the_grid_size(engine: AuraFlowEngine) -> None:
    patch_embed = engine.pipe.transformer.pos_embed
    assert isinstance(patch_embed, AuraFlowPatchEmbed)
    grid = int(patch_embed.pos_embed_max_size**0.5)
    stretched = interpolated_pos_embed(patch_embed, grid, grid, torch.float32)
    assert torch.allclose(stretched, patch_embed.pos_embed.detach(), atol=1e-6)
    wide = interpolated_pos_embed(patch_embed, grid // 2, grid + 16, torch.float32)
    assert wide.shape == (1, (grid // 2) * (grid + 16), patch_embed.pos_embed.shape[-1])


def test_in_grid_sizes_run_diffusers_code_bit_for_bit(engine: AuraFlowEngine) -> None:
    patch_embed = engine.pipe.transformer.pos_embed
    latent = torch.randn(2, 4, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = patch_embed(latent)
        theirs = AuraFlowPatchEmbed.forward(patch_embed, latent)
    assert torch.equal(ours, theirs)
