"""VAE decoding: its dtype, channels-last layout, and tiling above a size."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from auraserve.core.engine_options import EngineOptions
from auraserve.engine.components import AuraFlowPipeline, AutoencoderKL
from auraserve.engine.loading import DTYPES


def apply_vae(pipe: AuraFlowPipeline, options: EngineOptions, offload: str) -> list[str]:
    vae = pipe.vae
    log: list[str] = []
    layout_ok = offload != "sequential"  # weights are on the meta device behind hooks
    if options.vae_dtype != "same":
        if layout_ok:
            # nn.Module.to, not ModelMixin.to: the latter warns about fp32 modules that SDXL's
            # VAE does not have.
            nn.Module.to(vae, dtype=DTYPES[options.vae_dtype])
            log.append(f"vae: decodes in {options.vae_dtype}")
        else:
            log.append("vae: dtype kept (sequential offload)")
    channels_last = options.vae_channels_last and layout_ok
    if options.vae_channels_last:
        if channels_last:
            vae.to(memory_format=torch.channels_last)
            log.append("vae: channels-last weights and input")
        else:
            log.append("vae: channels-last skipped (sequential offload)")
    threshold = options.vae_tiling_above
    if threshold:
        if options.vae_tile_size:
            vae.tile_sample_min_size = options.vae_tile_size
            vae.tile_latent_min_size = options.vae_tile_size // pipe.vae_scale_factor
        log.append(
            f"vae: tiled decode above {threshold}² px (tiles of {vae.tile_sample_min_size} px, "
            f"overlap {vae.tile_overlap_factor:g})"
        )
    if channels_last or threshold:
        vae.decode = _Decode(vae, channels_last, threshold, pipe.vae_scale_factor)
    return log or ["vae: unchanged"]


class _Decode:
    """Installed as the VAE's decode: channels-last input, and tiling switched on per call
    for latents above the threshold."""

    def __init__(self, vae: AutoencoderKL, channels_last: bool, threshold: int, scale: int) -> None:
        self.vae = vae
        self.inner = vae.decode
        self.channels_last = channels_last
        self.threshold = threshold
        self.scale = scale

    def __call__(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.channels_last and z.dim() == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        if self.threshold:
            pixels = z.shape[-2] * z.shape[-1] * self.scale * self.scale
            # diffusers tiles only latents larger than one tile, and only when use_tiling is on.
            if pixels > self.threshold * self.threshold:
                self.vae.enable_tiling()
            else:
                self.vae.disable_tiling()
        return self.inner(z, *args, **kwargs)
