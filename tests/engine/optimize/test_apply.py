"""Speed modes (issue 5) on the tiny model, fp32 CPU, applied by `apply_optimizations`: each
keeps the image (PSNR against the unoptimised engine, same seed: ≥ 35 dB for bf16-class modes,
≥ 25 dB for fp8), the text cache is exact, what cannot run behind offload hooks is skipped, and
the default changes nothing at all."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from PIL import Image

from auraserve.core.engine_options import EngineOptions
from auraserve.engine.optimize import apply_optimizations, offload_mode
from auraserve.engine.pipeline import AuraFlowEngine, load_engine
from auraserve.engine.tiny import build_tiny_pipeline
from tests.engine.optimize.conftest import (
    BF16_BAR_DB,
    FP8_BAR_DB,
    first_image,
    psnr,
    small_request,
    tiny_engine,
)

# --- the default changes nothing --------------------------------------------------------------


@pytest.mark.parametrize("options", [None, EngineOptions()])
def test_default_options_touch_nothing(
    options: EngineOptions | None, baseline: Image.Image
) -> None:
    engine = tiny_engine(options)
    assert engine.optimization_log == [] and engine.text_cache is None
    transformer = engine.pipe.transformer
    assert "forward" not in vars(transformer)  # not wrapped
    assert not hasattr(transformer, "_auraserve_options")
    assert np.array_equal(np.asarray(first_image(engine)), np.asarray(baseline))


# --- quality per mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "bar", "expect_in_log"),
    [
        (EngineOptions(fuse_qkv=True), BF16_BAR_DB, "fused q/k/v"),
        (EngineOptions(sdpa_backend="math"), BF16_BAR_DB, "preference math"),
        (EngineOptions(sdpa_backend="flash"), BF16_BAR_DB, "preference flash, math"),
        (EngineOptions(sdpa_backend="auto"), BF16_BAR_DB, "kept torch's choice"),
        (EngineOptions(vae_channels_last=True), BF16_BAR_DB, "channels-last"),
        (EngineOptions(vae_dtype="bfloat16"), BF16_BAR_DB, "decodes in bfloat16"),
        (EngineOptions(fp8=True, fp8_backend="native"), FP8_BAR_DB, "per-row scales"),
        (
            EngineOptions(
                fuse_qkv=True,
                sdpa_backend="math",
                vae_channels_last=True,
                fp8=True,
                fp8_backend="native",
            ),
            FP8_BAR_DB,
            "fp8: native",
        ),
    ],
    ids=[
        "fuse_qkv",
        "sdpa_math",
        "sdpa_flash",
        "sdpa_auto",
        "vae_channels_last",
        "vae_bf16",
        "fp8_native",
        "fused_fp8_native",
    ],
)
def test_mode_keeps_the_image(
    options: EngineOptions, bar: float, expect_in_log: str, baseline: Image.Image
) -> None:
    engine = tiny_engine(options)
    assert any(expect_in_log in line for line in engine.optimization_log), engine.optimization_log
    quality = psnr(first_image(engine), baseline)
    assert quality >= bar, f"{quality:.1f} dB < {bar} dB"


# --- text cache ---------------------------------------------------------------------------------


def test_text_cache_is_exact_and_hits(baseline: Image.Image) -> None:
    engine = tiny_engine(EngineOptions(text_cache_size=8))
    assert engine.text_cache is not None
    first = first_image(engine)
    second = first_image(engine)
    assert np.array_equal(np.asarray(first), np.asarray(baseline))
    assert np.array_equal(np.asarray(second), np.asarray(baseline))
    stats = engine.text_cache.stats()
    assert (stats.misses, stats.hits, stats.entries) == (2, 2, 2)  # prompt + negative, twice


def test_text_cache_without_cfg_encodes_no_negative() -> None:
    engine = tiny_engine(EngineOptions(text_cache_size=8))
    uncached = tiny_engine()
    request = small_request(guidance_scale=1.0, negative_prompt="ignored")
    assert np.array_equal(
        np.asarray(first_image(engine, request)), np.asarray(first_image(uncached, request))
    )
    assert engine.text_cache is not None and len(engine.text_cache) == 1


# --- offload: what applies behind accelerate's hooks -------------------------------------------


class _CountingHook(ModelHook):  # type: ignore[misc]
    def __init__(self) -> None:
        self.calls = 0

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return args, kwargs


def test_model_offload_hooks_still_run_and_gpu_only_modes_skip(
    baseline: Image.Image, fresh_dynamo: None
) -> None:
    """The hook stands in for enable_model_cpu_offload's (one hook on the transformer)."""
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    hook = _CountingHook()
    add_hook_to_module(pipe.transformer, hook)
    assert offload_mode(pipe) == "model"
    options = EngineOptions(fuse_qkv=True, sdpa_backend="math", fp8=True, fp8_backend="native")
    engine = AuraFlowEngine(pipe, description="tiny", options=options)
    log = engine.optimization_log
    assert log[0].startswith("fuse_qkv: fused")
    assert "fp8: skipped (not with offload=model" in log[1]
    assert log[2].startswith("sdpa: backends")
    # Our forward wrapper wraps the hook's forward: the hook still runs, once per step.
    assert psnr(first_image(engine), baseline) >= BF16_BAR_DB
    assert hook.calls == 3


def test_sequential_offload_applies_only_what_needs_no_weights(fresh_dynamo: None) -> None:
    """Hooks on the layers stand in for enable_sequential_cpu_offload's."""
    pipe = build_tiny_pipeline()
    add_hook_to_module(pipe.transformer.single_transformer_blocks[0].ff.linear_1, ModelHook())
    assert offload_mode(pipe) == "sequential"
    options = EngineOptions(
        fuse_qkv=True,
        compile="blocks",
        vae_channels_last=True,
        vae_tiling_above=1024,
        sdpa_backend="math",
    )
    log = apply_optimizations(pipe, options)
    assert "fuse_qkv: skipped (sequential offload" in log[0]
    assert log[2].startswith("sdpa: backends")
    assert "compile: skipped (sequential offload" in log[3]
    assert "vae: channels-last skipped (sequential offload)" in log
    assert any(line.startswith("vae: tiled decode above 1024²") for line in log)
    assert not hasattr(pipe.transformer.joint_transformer_blocks[0].attn, "to_qkv")


# --- plumbing -----------------------------------------------------------------------------------


def test_applying_twice(fresh_dynamo: None) -> None:
    pipe = build_tiny_pipeline()
    options = EngineOptions(fuse_qkv=True)
    assert apply_optimizations(pipe, options)[0].startswith("fuse_qkv: fused")
    assert apply_optimizations(pipe, options) == ["optimisations already applied to this pipeline"]
    with pytest.raises(ValueError, match="already optimised"):
        apply_optimizations(pipe, EngineOptions(sdpa_backend="math"))
    assert offload_mode(pipe) == "none"


def test_warmup_runs_each_size_with_and_without_cfg() -> None:
    engine = tiny_engine()
    rows: list[tuple[int, int]] = []
    handle = engine.pipe.transformer.register_forward_pre_hook(
        lambda module, args: rows.append((int(args[0].shape[0]), int(args[0].shape[-1])))
    )
    try:
        seconds = engine.warmup([(64, 64), (96, 64)], steps=1)
    finally:
        handle.remove()
    assert seconds > 0
    # Latent widths 8 and 12; 2 rows with CFG, then 1 without, per size.
    assert rows == [(2, 8), (1, 8), (2, 12), (1, 12)]
    assert engine.warmup([], steps=1) < 0.01


def test_load_engine_takes_options() -> None:
    engine = load_engine(
        "tiny", device="cpu", dtype="float32", options=EngineOptions(text_cache_size=3)
    )
    assert engine.options.text_cache_size == 3
    assert engine.text_cache is not None and engine.text_cache.max_entries == 3
    assert engine.optimization_log[-1].startswith("text cache: up to 3")
