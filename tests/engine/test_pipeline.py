"""AuraFlowEngine on the tiny model: exactness vs diffusers, batching, seeds, sizes, cancel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler
from PIL import Image

from auraserve.core.request import GenerationRequest
from auraserve.core.samplers import SAMPLERS
from auraserve.engine.base import Engine
from auraserve.engine.pipeline import AuraFlowEngine
from auraserve.engine.pos_embed import max_grid_pixels
from auraserve.errors import JobCancelled, UnsupportedRequest
from tests.batch_cases import PER_BATCH, PER_ROW, changed
from tests.engine.conftest import make_request, make_small_request


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> AuraFlowPipeline:
    """Plain diffusers on the same saved weights."""
    pipe = AuraFlowPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_image(pipe: AuraFlowPipeline, request: GenerationRequest) -> Image.Image:
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=request.shift)
    result = pipe(
        request.prompt,
        negative_prompt=request.negative_prompt,
        guidance_scale=request.guidance_scale,
        num_inference_steps=request.steps,
        height=request.height,
        width=request.width,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    )
    image: Image.Image = result.images[0]
    return image


class _ForwardBatches:
    """Records the batch size of every transformer forward pass."""

    def __init__(self, engine: AuraFlowEngine) -> None:
        self.sizes: list[int] = []
        self._handle = engine.pipe.transformer.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.sizes.append(int(args[0].shape[0]))

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def forward_batches(engine: AuraFlowEngine) -> Iterator[_ForwardBatches]:
    recorder = _ForwardBatches(engine)
    yield recorder
    recorder.close()


def test_engine_protocol(engine: AuraFlowEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.is_test_model
    assert "cpu, float32" in engine.description


# --- exactness against diffusers ----------------------------------------------------------


def test_euler_normal_matches_diffusers_with_cfg(
    engine: AuraFlowEngine, reference: AuraFlowPipeline, forward_batches: _ForwardBatches
) -> None:
    request = make_request(negative_prompt="blurry, watermark", guidance_scale=5.0, steps=4)
    [result] = engine.generate([request])
    ours = _pixels(result.images[0])
    theirs = _pixels(_diffusers_image(reference, request))
    assert ours.shape == theirs.shape == (512, 512, 3)
    assert np.abs(ours - theirs).max() <= 1
    assert ours.std() > 10  # a real image, not a flat one where any code would "match"
    # CFG: one batched forward per step holding the uncond and cond rows.
    assert forward_batches.sizes[:4] == [2, 2, 2, 2]
    assert result.seeds == [request.seed] and not result.cancelled and not result.warnings
    assert result.prompt_used == request.prompt and result.engine_seconds > 0


def test_guidance_at_most_one_skips_the_uncond_pass(
    engine: AuraFlowEngine, reference: AuraFlowPipeline, forward_batches: _ForwardBatches
) -> None:
    request = make_small_request(
        size=256, guidance_scale=1.0, negative_prompt="ignored without CFG", steps=3
    )
    [result] = engine.generate([request])
    assert forward_batches.sizes[:3] == [1, 1, 1]
    theirs = _pixels(_diffusers_image(reference, request))
    assert np.abs(_pixels(result.images[0]) - theirs).max() <= 1


# --- batching and seeds ------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde"])
def test_batched_requests_equal_running_each_alone(
    engine: AuraFlowEngine, sampler: str, forward_batches: _ForwardBatches
) -> None:
    common = {"size": 128, "sampler": sampler, "steps": 2}
    requests = [
        make_small_request(
            prompt="a red fox in the snow", guidance_scale=4.0, num_images=2, seed=10, **common
        ),
        make_small_request(prompt="a castle on a hill", guidance_scale=1.0, seed=99, **common),
        make_small_request(
            prompt="a blue bird", negative_prompt="dark", guidance_scale=7.5, seed=10, **common
        ),
    ]
    batched = engine.generate(requests)
    # 3 uncond rows (requests 0 and 2) + 4 cond rows, in one forward per model evaluation.
    assert set(forward_batches.sizes) == {7}
    for request, result in zip(requests, batched, strict=True):
        [alone] = engine.generate([request])
        assert len(result.images) == request.num_images
        for image, single in zip(result.images, alone.images, strict=True):
            assert np.array_equal(_pixels(image), _pixels(single))
    # Same seed, different prompt and guidance: different images.
    assert not np.array_equal(_pixels(batched[0].images[0]), _pixels(batched[2].images[0]))


def test_row_chunking_changes_nothing(engine: AuraFlowEngine) -> None:
    chunked = AuraFlowEngine(engine.pipe, description="chunked", max_rows=2)
    requests = [
        make_small_request(num_images=2, guidance_scale=3.0, steps=2, seed=3),
        make_small_request(prompt="a boat", guidance_scale=1.0, steps=2, seed=4),
    ]
    batches = _ForwardBatches(chunked)
    try:
        results = chunked.generate(requests)
    finally:
        batches.close()
    assert batches.sizes[:3] == [2, 2, 1]  # 5 rows (2 uncond + 3 cond) in chunks of 2
    for result, expected in zip(results, engine.generate(requests), strict=True):
        for ours, theirs in zip(result.images, expected.images, strict=True):
            assert np.array_equal(_pixels(ours), _pixels(theirs))


def test_image_i_uses_seed_plus_i(engine: AuraFlowEngine) -> None:
    [pair] = engine.generate([make_small_request(num_images=2, seed=500, steps=2)])
    [second] = engine.generate([make_small_request(seed=501, steps=2)])
    assert pair.seeds == [500, 501]
    assert np.array_equal(_pixels(pair.images[1]), _pixels(second.images[0]))
    assert not np.array_equal(_pixels(pair.images[0]), _pixels(pair.images[1]))


@pytest.mark.parametrize(("field", "value"), PER_ROW.items())
def test_requests_with_one_batch_key_share_a_batch_unchanged(
    engine: AuraFlowEngine, field: str, value: object
) -> None:
    base = make_small_request(size=64, steps=2, seed=5)
    other = changed(base, **{field: value})
    assert other.batch_key == base.batch_key
    together = engine.generate([base, other])
    for request, result in zip([base, other], together, strict=True):
        [alone] = engine.generate([request])
        assert len(result.images) == len(alone.images) == request.num_images
        for image, single in zip(result.images, alone.images, strict=True):
            assert np.array_equal(_pixels(image), _pixels(single)), field


@pytest.mark.parametrize(("field", "value"), PER_BATCH.items())
def test_requests_with_different_batch_keys_never_share_one(
    engine: AuraFlowEngine, field: str, value: object
) -> None:
    base = make_small_request(size=64, steps=2)
    other = changed(base, **{field: value})
    calls: list[int] = []
    # The worker's bug, not the client's: a plain ValueError (the jobs ERROR, not FAIL).
    with pytest.raises(ValueError, match="share its batch key") as info:
        engine.generate([base, other], on_step=lambda i, n: calls.append(i))
    assert not isinstance(info.value, UnsupportedRequest)
    assert calls == []  # refused before any work
    assert engine.generate([]) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 120}, "multiples of 16"),
        ({"sampler": "warp_drive"}, "unknown sampler 'warp_drive'"),
        ({"scheduler": "someday"}, "unknown scheduler 'someday'"),
        ({"steps": 0}, "steps must be"),
        ({"shift": -1.0}, "shift must be"),
        ({"shift": float("nan")}, "shift must be"),
    ],
)
def test_a_request_the_model_cannot_run_is_unsupported(
    engine: AuraFlowEngine, change: dict[str, object], message: str
) -> None:
    """The engine's own verdict, which the worker turns into FAILED (charged nothing).
    model_construct: the API's validation would refuse these before they got here."""
    valid = make_small_request(size=64, steps=1)
    request = GenerationRequest.model_construct(**{**valid.model_dump(), **change})
    calls: list[int] = []
    with pytest.raises(UnsupportedRequest, match=message):
        engine.generate([request], on_step=lambda i, n: calls.append(i))
    assert calls == []  # refused before any work


# --- sizes beyond the learned positional grid --------------------------------------------


def test_size_beyond_the_grid_works_where_diffusers_crashes(
    engine: AuraFlowEngine, reference: AuraFlowPipeline
) -> None:
    assert max_grid_pixels(engine.pipe) == 768
    valid = make_request(width=512, height=800, steps=1, guidance_scale=1.0)
    # Narrow (validation skipped) to keep the test fast; the height is what exceeds the grid.
    request = valid.model_construct(**{**valid.model_dump(), "width": 128})
    [result] = engine.generate([request])
    image = result.images[0]
    assert image.size == (128, 800)
    assert _pixels(image).std() > 5
    with pytest.raises(IndexError):
        _diffusers_image(reference, request)


# --- prompts ---------------------------------------------------------------------------


def test_prompt_longer_than_256_tokens_warns(engine: AuraFlowEngine) -> None:
    long_prompt = " ".join(["a cat in a garden with red flowers"] * 40)  # 320 words
    [result] = engine.generate([make_small_request(size=64, prompt=long_prompt, steps=1)])
    assert len(result.images) == 1
    assert len(result.warnings) == 1
    assert "256" in result.warnings[0] and "ignored" in result.warnings[0]


def test_expand_prompt_uses_the_expander(engine: AuraFlowEngine) -> None:
    request = make_small_request(prompt="a lighthouse", expand_prompt=True, steps=1)
    [result] = engine.generate([request])
    assert result.prompt_used.startswith("a lighthouse") and len(result.prompt_used) > 40
    [plain] = engine.generate([make_small_request(prompt="a lighthouse", steps=1)])
    assert plain.prompt_used == "a lighthouse"


def test_expansion_is_cut_to_the_models_window_never_the_users_words(
    engine: AuraFlowEngine,
) -> None:
    long_prompt = " ".join(["a cat in a garden with red flowers"] * 30)  # 240 words: 241 ids
    request = make_small_request(prompt=long_prompt, expand_prompt=True, steps=1)
    [result] = engine.generate([request])
    used = result.prompt_used
    assert used.startswith(long_prompt) and len(used) > len(long_prompt)
    assert len(engine.pipe.tokenizer(used).input_ids) <= 256
    # What was cut is said; nothing the model reads was ignored.
    assert len(result.warnings) == 1 and "left out" in result.warnings[0], result.warnings


# --- progress and cancellation -----------------------------------------------------------


def test_on_step_reports_every_step(engine: AuraFlowEngine) -> None:
    steps: list[tuple[int, int]] = []
    engine.generate([make_small_request(steps=3)], on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_cancelling_every_request_stops_within_one_step(
    engine: AuraFlowEngine, forward_batches: _ForwardBatches
) -> None:
    seen: list[int] = []

    def cancelled() -> set[int]:
        return {0, 1} if seen and seen[-1] >= 2 else set()

    requests = [make_small_request(steps=8), make_small_request(steps=8, seed=7)]
    with pytest.raises(JobCancelled):
        engine.generate(requests, on_step=lambda i, n: seen.append(i), cancelled=cancelled)
    assert seen == [1, 2]
    assert len(forward_batches.sizes) == 2  # no model evaluation after the cancel


def test_cancelling_some_requests_keeps_the_others(engine: AuraFlowEngine) -> None:
    requests = [make_small_request(steps=3, seed=1), make_small_request(steps=3, seed=2)]
    results = engine.generate(requests, cancelled=lambda: {1})
    assert results[0].images and not results[0].cancelled
    assert results[1].cancelled and results[1].images == []
    [alone] = engine.generate([requests[0]])
    assert np.array_equal(_pixels(results[0].images[0]), _pixels(alone.images[0]))


# --- every sampler -----------------------------------------------------------------------


def test_every_sampler_and_scheduler_runs_without_nan(engine: AuraFlowEngine) -> None:
    finite: list[bool] = []

    def check(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        finite.append(bool(torch.isfinite(args[0]).all()))

    handle = engine.pipe.vae.post_quant_conv.register_forward_pre_hook(check)
    try:
        for index, sampler in enumerate(SAMPLERS):
            scheduler = ("normal", "karras", "beta", "simple", "exponential")[index % 5]
            request = make_small_request(
                size=64, sampler=sampler, scheduler=scheduler, steps=3, guidance_scale=3.0
            )
            [result] = engine.generate([request])
            assert result.images[0].size == (64, 64), sampler
        for scheduler in ("sgm_uniform", "ddim_uniform", "linear_quadratic", "kl_optimal"):
            engine.generate([make_small_request(size=64, scheduler=scheduler, steps=3)])
    finally:
        handle.remove()
    assert finite and all(finite)


def test_stochastic_sampler_is_reproducible(engine: AuraFlowEngine) -> None:
    request = make_small_request(sampler="euler_ancestral", steps=3)
    [a], [b] = engine.generate([request]), engine.generate([request])
    assert np.array_equal(_pixels(a.images[0]), _pixels(b.images[0]))
    [other] = engine.generate([request.model_copy(update={"sampler": "euler"})])
    assert not np.array_equal(_pixels(a.images[0]), _pixels(other.images[0]))
