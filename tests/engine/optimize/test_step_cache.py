"""Step caching (engine.optimize.step_cache) on the tiny model, fp32 CPU.

Random weights move the first block's residual by 40–130 % between calls, so the tests force
skips with a threshold far above any real setting (`SKIPPY`); real checkpoints change by a
few percent per step and the presets use 0.05–0.12.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from auraserve.core.engine_options import EngineOptions
from auraserve.core.request import GenerationRequest
from auraserve.core.samplers import SAMPLERS
from auraserve.engine.optimize import step_cache
from tests.engine.optimize.conftest import psnr, small_request, tiny_engine

SKIPPY = 2.0  # relative change below which a row skips: with random weights, most calls
# The agreement a forced-skip image keeps with the exact one on the tiny model (measured:
# 20–40 dB); it shows the skip path adds the right residual, not the quality on real weights.
CACHE_BAR_DB = 12.0


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize("method", ["fbcache", "taylorseer"])
def test_threshold_zero_is_bit_identical(method: str) -> None:
    request = small_request(steps=6, sampler="heun")  # two calls per step, CFG rows
    [exact] = tiny_engine().generate([request])
    engine = tiny_engine(EngineOptions(step_cache=method, cache_threshold=0.0, cache_warmup=0))
    [cached] = engine.generate([request])
    assert np.array_equal(_pixels(cached.images[0]), _pixels(exact.images[0]))
    assert cached.fidelity == {"exact": True}


@pytest.mark.parametrize("method", ["fbcache", "taylorseer"])
def test_positive_threshold_skips_and_stays_close(method: str) -> None:
    request = small_request(steps=10)
    [exact] = tiny_engine().generate([request])
    options = EngineOptions(step_cache=method, cache_threshold=SKIPPY, cache_warmup=2)
    [cached] = tiny_engine(options).generate([request])
    [item] = cached.fidelity["lossy"]
    assert cached.fidelity["exact"] is False
    assert item["option"] == "step_cache" and item["method"] == method
    assert item["threshold"] == SKIPPY and item["warmup_steps"] == 2
    # 10 euler steps × 2 rows (cond + uncond); no skip in the 2 warm-up steps, and at most
    # 3 in a row per row.
    assert item["transformer_calls"] == 20
    assert 0 < item["skipped_calls"] <= 16
    assert not np.array_equal(_pixels(cached.images[0]), _pixels(exact.images[0]))
    assert psnr(cached.images[0], exact.images[0]) >= CACHE_BAR_DB


def test_warmup_covers_every_step_means_no_skip() -> None:
    options = EngineOptions(step_cache="fbcache", cache_threshold=SKIPPY, cache_warmup=100)
    request = small_request(steps=4)
    [cached] = tiny_engine(options).generate([request])
    [exact] = tiny_engine().generate([request])
    assert cached.fidelity == {"exact": True}
    assert np.array_equal(_pixels(cached.images[0]), _pixels(exact.images[0]))


def _splitting_threshold(jobs: list[GenerationRequest]) -> float:
    """A threshold that makes rows of one transformer call decide differently.

    On random weights the first block's change is driven by σ, so all rows of a call come out
    within a few percent of each other; a threshold far above or below them would make every
    row decide alike, and a shared (batch-wide) decision would go unnoticed. This records
    each row's change in an uncached run and returns the midpoint of the widest gap inside
    one call."""
    seen: dict[int, list[float]] = {}
    original = step_cache.StepCache._decide

    def record(self: step_cache.StepCache, g: int, residual: torch.Tensor) -> bool:
        ref = self._first_ref[g]
        if ref is not None:
            change = float((residual - ref).abs().mean() / ref.abs().mean())
            seen.setdefault(self.completed_steps, []).append(change)
        return original(self, g, residual)

    probe = EngineOptions(step_cache="fbcache", cache_threshold=0.0, cache_warmup=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_cache.StepCache, "_decide", record)
        tiny_engine(probe).generate(jobs)
    gaps = []
    for changes in seen.values():
        ordered = sorted(changes)
        gaps += [(b - a, (a + b) / 2) for a, b in itertools.pairwise(ordered)]
    return max(gaps)[1]


def test_batched_jobs_equal_the_same_jobs_alone() -> None:
    """One job's cache state never decides or feeds another's rows, with or without CFG,
    with several images per job, and across max_rows chunks: each row decides alone."""
    a = small_request(steps=6, seed=1, num_images=2, prompt="a red fox")
    b = small_request(steps=6, seed=9, guidance_scale=1.0, prompt="a blue lake")
    c = small_request(steps=6, seed=5, prompt="a green hill", negative_prompt="")
    jobs = [a, b, c]
    threshold = _splitting_threshold(jobs)
    for method in ("fbcache", "taylorseer"):
        options = EngineOptions(
            step_cache=method, cache_threshold=threshold, cache_warmup=1, cache_max_skip=0
        )
        engine = tiny_engine(options)
        alone = [engine.generate([job])[0] for job in jobs]
        engine.max_rows = 3  # chunks cut across jobs
        together = engine.generate(jobs)
        for one, batched in zip(alone, together, strict=True):
            assert one.fidelity == batched.fidelity
            for x, y in zip(one.images, batched.images, strict=True):
                assert np.array_equal(_pixels(x), _pixels(y))
        skips = [
            r.fidelity["lossy"][0]["skipped_calls"] / r.fidelity["lossy"][0]["transformer_calls"]
            if not r.fidelity["exact"]
            else 0.0
            for r in together
        ]
        assert len(set(skips)) > 1, (method, threshold, skips)  # rows did decide differently


def test_exact_request_runs_without_the_cache() -> None:
    options = EngineOptions(step_cache="fbcache", cache_threshold=SKIPPY, cache_warmup=0)
    request = small_request(steps=6).model_copy(update={"exact": True})
    [cached] = tiny_engine(options).generate([request])
    [exact] = tiny_engine().generate([request])
    assert cached.fidelity == {"exact": True}
    assert np.array_equal(_pixels(cached.images[0]), _pixels(exact.images[0]))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_composes(sampler: str) -> None:
    """Threshold 0 through the cache machinery is the exact image for every sampler (one,
    two or three model calls per step), and a forced-skip run stays finite and close."""
    request = small_request(size=64, steps=5, sampler=sampler)
    [exact] = tiny_engine().generate([request])
    zero = EngineOptions(step_cache="taylorseer", cache_threshold=0.0, cache_warmup=0)
    [same] = tiny_engine(zero).generate([request])
    assert np.array_equal(_pixels(same.images[0]), _pixels(exact.images[0]))
    skippy = EngineOptions(step_cache="fbcache", cache_threshold=SKIPPY, cache_warmup=1)
    [cached] = tiny_engine(skippy).generate([request])
    assert cached.fidelity["exact"] is False, sampler
    assert psnr(cached.images[0], exact.images[0]) >= CACHE_BAR_DB - 4, sampler


def test_presets_and_parse() -> None:
    from auraserve.core.engine_options import PRESETS

    cache = [name for name in PRESETS if name.startswith("cache_")]
    assert {"cache_light", "cache_fast", "cache_taylor", "cache_max"} <= set(cache)
    assert all(PRESETS[name].step_cache_lossy for name in cache)
    parsed = EngineOptions.parse("cache_fast,cache_threshold=0.2,cache_warmup=4")
    assert (parsed.step_cache, parsed.cache_threshold, parsed.cache_warmup) == ("fbcache", 0.2, 4)
    with pytest.raises(ValueError, match="cache_threshold"):
        EngineOptions.parse("step_cache=fbcache,cache_threshold=-1")
    with pytest.raises(ValueError, match="step_cache"):
        EngineOptions.parse("step_cache=magic")
    assert PRESETS["cache_fast"].exact().lossy() == []
    assert PRESETS["fp8_native"].exact() == PRESETS["fp8_native"]  # fp8 is in the weights


def test_exact_request_on_fp8_weights_fails_clearly() -> None:
    from auraserve.errors import UnsupportedRequest

    engine = tiny_engine(EngineOptions(fp8=True, fp8_backend="native"))
    [result] = engine.generate([small_request(steps=2)])
    assert result.fidelity == {"exact": False, "lossy": [{"option": "fp8", "backend": "native"}]}
    with pytest.raises(UnsupportedRequest, match=r"exact: .*fp8"):
        engine.generate([small_request(steps=2).model_copy(update={"exact": True})])


def test_lora_hot_swap_composes(tmp_path: Path) -> None:
    """Adapters swapped between batches: a cached image depends only on its own request (the
    cache state lives per batch), and threshold 0 is the uncached adapter image."""
    from auraserve.core.lora import LoraSpec, available_loras
    from auraserve.engine.lora import LoraOptions
    from auraserve.engine.pipeline import AuraFlowEngine
    from auraserve.engine.tiny import build_tiny_pipeline
    from tests.engine.test_lora import save_adapter

    save_adapter(tmp_path / "style", rank=4, alpha=8, seed=1)
    save_adapter(tmp_path / "other", rank=4, alpha=4, seed=2)

    def engine(options: EngineOptions) -> AuraFlowEngine:
        lora = LoraOptions(registry=lambda: available_loras(tmp_path), max_rank=8)
        return AuraFlowEngine(build_tiny_pipeline(), description="t", options=options, lora=lora)

    def request(name: str) -> GenerationRequest:
        plain = small_request(size=64, steps=6)
        return plain.model_copy(update={"loras": (LoraSpec(name=name, scale=1.0),)})

    [reference] = engine(EngineOptions()).generate([request("style")])
    zero = engine(EngineOptions(step_cache="fbcache", cache_threshold=0.0))
    assert np.array_equal(
        _pixels(zero.generate([request("style")])[0].images[0]), _pixels(reference.images[0])
    )
    cached = engine(EngineOptions(step_cache="fbcache", cache_threshold=SKIPPY, cache_warmup=1))
    [first] = cached.generate([request("style")])
    cached.generate([request("other")])
    [again] = cached.generate([request("style")])
    assert first.fidelity["exact"] is False and first.fidelity == again.fidelity
    assert np.array_equal(_pixels(first.images[0]), _pixels(again.images[0]))


def test_compiled_blocks_compose(fresh_dynamo: None) -> None:
    """compile=blocks: the cache calls the same compiled block modules; threshold 0 gives
    the compiled engine's own image, and skipped rows (smaller batches) still run."""
    request = small_request(size=64, steps=5)
    [compiled] = tiny_engine(EngineOptions(compile="blocks")).generate([request])
    zero = EngineOptions(compile="blocks", step_cache="fbcache", cache_threshold=0.0)
    [same] = tiny_engine(zero).generate([request])
    assert np.array_equal(_pixels(same.images[0]), _pixels(compiled.images[0]))
    skippy = EngineOptions(
        compile="blocks", step_cache="taylorseer", cache_threshold=SKIPPY, cache_warmup=1
    )
    [cached] = tiny_engine(skippy).generate([request])
    assert cached.fidelity["lossy"][0]["skipped_calls"] > 0
    assert psnr(cached.images[0], compiled.images[0]) >= CACHE_BAR_DB - 4
