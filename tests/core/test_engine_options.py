"""EngineOptions: validation, the mode-string syntax and the presets, all without torch."""

from __future__ import annotations

import pytest

from auraserve.core.engine_options import PRESETS, EngineOptions


def test_options_validate_and_parse() -> None:
    assert EngineOptions().is_default
    with pytest.raises(ValueError, match="sdpa_backend"):
        EngineOptions(sdpa_backend="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cuda_graphs needs compile"):
        EngineOptions(cuda_graphs=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        EngineOptions(vae_tile_size=100)
    assert EngineOptions.parse("") == EngineOptions()
    assert EngineOptions.parse("fast") == PRESETS["fast"]
    parsed = EngineOptions.parse("fast, fp8=1, fp8_backend=native, text_cache_size=1024")
    assert parsed == PRESETS["fp8_native"].__class__(
        **{**PRESETS["fp8_native"].as_dict(), "text_cache_size": 1024}
    )
    with pytest.raises(ValueError, match="unknown engine mode"):
        EngineOptions.parse("turbo")
    with pytest.raises(ValueError, match="unknown engine option"):
        EngineOptions.parse("speed=11")
    with pytest.raises(ValueError, match="boolean"):
        EngineOptions.parse("fuse_qkv=maybe")
    # Each single-optimisation preset differs from the default in one concern only.
    for name in ("fused_qkv", "sdpa", "compile", "text_cache"):
        changed = [
            k for k, v in PRESETS[name].as_dict().items() if v != getattr(EngineOptions(), k)
        ]
        assert len(changed) == 1, (name, changed)


def test_replace_validates() -> None:
    fast = PRESETS["fast"]
    assert fast.replace(cuda_graphs=True) == PRESETS["fast_cudagraphs"]
    assert fast.replace(cuda_graphs=True) != fast  # a copy: the preset is untouched
    with pytest.raises(ValueError, match="cuda_graphs needs compile"):
        EngineOptions().replace(cuda_graphs=True)
