"""One image across processes (`engine.parallel`, `engine.ulysses`): two real processes on
gloo give one process's images, split by CFG rows (`cfg=2`) or by tokens (`ulysses=2`), for
first-order, stochastic and second-order samplers, with and without LoRA, for batches whose
uncond and cond halves differ in size and for token counts that do not divide by the ranks.
Four ranks (ulysses=4, cfg=2,ulysses=2) run through the CLI (tests/cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from auraserve.core.engine_options import EngineOptions
from auraserve.core.lora import LoraSpec, available_loras
from auraserve.core.request import GenerationRequest
from auraserve.engine.lora import LoraOptions
from auraserve.engine.parallel import (
    ParallelSpec,
    RowSplit,
    install,
    parse_parallel,
    start_group,
)
from auraserve.engine.pipeline import AuraFlowEngine
from auraserve.engine.tiny import build_tiny_pipeline
from auraserve.errors import ConfigError
from tests.engine.conftest import make_small_request
from tests.engine.test_lora import save_adapter


def _engine(lora_dir: Path) -> AuraFlowEngine:
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    options = LoraOptions(registry=lambda: available_loras(lora_dir), max_rank=8)
    return AuraFlowEngine(pipe, description="tiny", is_test_model=True, lora=options)


def _request(sampler: str, *, lora: bool = False, **overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {"size": 64, "steps": 2, "seed": 11, "sampler": sampler}
    fields.update(overrides)
    request = make_small_request(**fields)
    if lora:
        request = request.model_copy(update={"loras": (LoraSpec(name="style", scale=0.8),)})
    return request


def _batches(spec: ParallelSpec) -> list[list[GenerationRequest]]:
    if spec.ulysses > 1:
        return [
            [_request("euler")],
            [_request("euler_ancestral", lora=True)],
            [_request("heun")],
            [_request("euler", lora=True)],
            [_request("dpmpp_2m_sde")],
            [_request("heun", lora=True)],
            # 48² px: 3x3 = 9 image tokens, padded to 10 for two ranks; two prompts, CFG.
            [_request("euler", size=48, num_images=2), _request("euler", seed=4, size=48)],
        ]
    return [
        [_request("euler")],
        [_request("euler_ancestral")],
        [_request("dpmpp_sde", lora=True)],
        [_request("heun")],
        [_request("dpmpp_2m", lora=True)],
        [_request("euler", lora=True)],
        # Uneven halves: 1 uncond row + 3 cond rows, then a lone row without CFG.
        [_request("euler", num_images=2), _request("euler", guidance_scale=1.0, seed=3)],
        [_request("euler", guidance_scale=1.0)],
    ]


def _run_all(engine: AuraFlowEngine, spec: ParallelSpec) -> list[list[Image.Image]]:
    return [
        [image for result in engine.generate(batch) for image in result.images]
        for batch in _batches(spec)
    ]


def _velocity(engine: AuraFlowEngine) -> torch.Tensor:
    """The transformer alone on 7 text tokens (+ 8 register tokens) and a 3x3-patch latent:
    both streams odd, so both are padded across two ranks. Images at 1/255 would not see a
    padded key let into attention in the tiny model (1.5e-5 here); the velocity does."""
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 4, 6, 6, generator=generator)
    text = torch.randn(2, 7, 32, generator=generator)
    with torch.no_grad():
        out = engine.pipe.transformer(
            latent, encoder_hidden_states=text, timestep=torch.tensor([0.5]), return_dict=False
        )[0]
    return cast(torch.Tensor, out)


def _follower(index: int, port: int, spec: ParallelSpec, lora_dir: Path) -> None:
    from auraserve.engine.parallel import join_group, leave_group

    split = join_group(index + 1, spec, port, "cpu")
    try:
        engine = _engine(lora_dir)
        install(engine, split)
        _run_all(engine, spec)
        if spec.ulysses > 1:
            _velocity(engine)
    finally:
        leave_group()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    save_adapter(root / "style", rank=4, alpha=8, seed=1)
    return root


@pytest.mark.parametrize("mode", ["cfg=2", "ulysses=2"])
def test_two_ranks_draw_the_single_process_images(lora_dir: Path, mode: str) -> None:
    spec = parse_parallel(mode)
    single = _run_all(_engine(lora_dir), spec)
    group = start_group(_follower, (spec, lora_dir), spec, "cpu")
    try:
        engine = _engine(lora_dir)
        install(engine, group.split)
        assert (engine.row_split is None) == (spec.cfg == 1)
        split = _run_all(engine, spec)
        if spec.ulysses > 1:
            velocity = _velocity(engine)
    except BaseException:
        group.abort()
        raise
    group.finish()
    for batch, (one, two) in enumerate(zip(single, split, strict=True)):
        assert len(one) == len(two) > 0
        for a, b in zip(one, two, strict=True):
            diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
            assert diff <= 1, f"batch {batch}: {diff}/255"
    if spec.ulysses > 1:
        assert (velocity - _velocity(_engine(lora_dir))).abs().max() < 1e-6
    # The LoRA really changed the image (else the LoRA cases would prove nothing).
    with_lora = 5 if spec.cfg > 1 else 3
    assert not np.array_equal(np.asarray(single[0][0]), np.asarray(single[with_lora][0]))


def test_a_follower_that_fails_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="boom"):
        start_group(_failing_follower, (), 2, "cpu")


def _failing_follower(index: int, port: int) -> None:
    raise RuntimeError("boom: the model did not load")


def test_rows_split_into_equal_padded_slices() -> None:
    # 2 uncond + 2 cond rows: rank 0 the uncond half, rank 1 the cond half.
    assert RowSplit(0, 2).indices(4) == [0, 1]
    assert RowSplit(1, 2).indices(4) == [2, 3]
    # Uneven: 3 rows, the last slice repeats its last row; 1 row: both ranks compute it.
    assert RowSplit(1, 2).indices(3) == [2, 2]
    assert RowSplit(0, 2).indices(1) == [0] and RowSplit(1, 2).indices(1) == [0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cfg=3", "cfg must be 2"),
        ("ulysses=1", "ulysses must be 2 or more"),
        ("ulysses=x", "ulysses must be an integer"),
        ("tp=2", "expected cfg=2, ulysses=N"),
        ("cfg=2,cfg=2", "expected cfg=2, ulysses=N"),
        ("", "expected cfg=2, ulysses=N"),
    ],
)
def test_parallel_spec_refuses_what_is_not_built(text: str, message: str) -> None:
    assert parse_parallel("cfg=2").world_size == 2
    assert parse_parallel("ulysses=4") == ParallelSpec(ulysses=4)
    both = parse_parallel(" cfg=2, ulysses=3 ")
    assert both.world_size == 6 and str(both) == "cfg=2,ulysses=3"
    with pytest.raises(ConfigError, match=message):
        parse_parallel(text)


def test_ulysses_must_divide_the_heads() -> None:
    from auraserve.engine.ulysses import SequenceSplit, install_sequence_split

    transformer = build_tiny_pipeline().transformer  # 4 heads
    with pytest.raises(ConfigError, match=r"ulysses=3: the model has 4 attention heads.*\(2, 4\)"):
        install_sequence_split(transformer, SequenceSplit(0, 3))


def test_token_shards_are_equal_and_padding_is_left_out() -> None:
    from auraserve.engine.ulysses import SequenceSplit

    split = SequenceSplit(1, 2)
    layout = split.plan(text=3, image=5, device=torch.device("cpu"))
    assert (layout.text_shard, layout.image_shard) == (2, 3)
    # Gathered: rank 0 [t0 t1 i0 i1 i2], rank 1 [t2 pad i3 i4 pad].
    assert layout.valid is not None and layout.valid.tolist() == [0, 1, 2, 3, 4, 5, 7, 8]
    tokens = torch.arange(5.0).view(1, 5, 1)
    assert split.shard(tokens, 3).flatten().tolist() == [3.0, 4.0, 0.0]
    assert split.plan(text=4, image=6, device=torch.device("cpu")).valid is None


def test_a_step_cache_engine_is_refused() -> None:
    pipe = build_tiny_pipeline()
    engine = AuraFlowEngine(pipe, description="tiny", options=EngineOptions(step_cache="fbcache"))
    with pytest.raises(ConfigError, match="step_cache"):
        install(engine, RowSplit(0, 2))
    assert engine.row_split is None


def test_a_compile_engine_is_refused_for_ulysses() -> None:
    from auraserve.engine.parallel import place

    pipe = build_tiny_pipeline()
    engine = AuraFlowEngine(pipe, description="tiny", options=EngineOptions(compile="blocks"))
    with pytest.raises(ConfigError, match="ulysses does not combine with the compile"):
        install(engine, place(0, ParallelSpec(ulysses=2)))
    # Rows alone (cfg=2) leave the transformer whole: compile is fine there.
    install(engine, RowSplit(0, 2))
    assert engine.row_split is not None
