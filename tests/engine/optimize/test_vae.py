"""VAE decoding: tiling above a size, and the tile size."""

from __future__ import annotations

import numpy as np
from PIL import Image

from auraserve.core.engine_options import EngineOptions
from auraserve.engine.pipeline import AuraFlowEngine
from tests.engine.optimize.conftest import (
    BF16_BAR_DB,
    first_image,
    psnr,
    small_request,
    tiny_engine,
)


def _count_tiled_decodes(engine: AuraFlowEngine) -> list[int]:
    calls: list[int] = []
    vae = engine.pipe.vae
    inner = vae.tiled_decode

    def tiled_decode(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return inner(*args, **kwargs)

    vae.tiled_decode = tiled_decode
    return calls


def test_vae_tiling_only_above_the_threshold(baseline: Image.Image) -> None:
    engine = tiny_engine(EngineOptions(vae_tiling_above=128, vae_tile_size=128))
    calls = _count_tiled_decodes(engine)
    # 128² is not above 128²: untiled, so bit-identical.
    assert np.array_equal(np.asarray(first_image(engine)), np.asarray(baseline))
    assert calls == []
    large = small_request(size=256)
    tiled = first_image(engine, large)
    assert calls == [1]
    reference = first_image(tiny_engine(), large)
    # Tiles of 128 px over a 256² image: the tile/image ratio of SDXL's 1024-px tiles on a
    # 2048² image. Tiles are decoded with their own GroupNorm statistics; on this random VAE
    # that costs ~32 dB (≥ 35 on bf16 modes is the bar; real VAE weights need a GPU check).
    assert psnr(tiled, reference) >= 30.0


def test_vae_tile_size_option() -> None:
    engine = tiny_engine(EngineOptions(vae_tiling_above=64, vae_tile_size=192))
    assert engine.pipe.vae.tile_sample_min_size == 192
    assert engine.pipe.vae.tile_latent_min_size == 24
    large = small_request(size=256)
    # Bigger tiles, fewer seams: the bar is met.
    assert psnr(first_image(engine, large), first_image(tiny_engine(), large)) >= BF16_BAR_DB
