"""Checkpoints and previews through `AuraFlowEngine.generate` on the tiny model.

The main test interrupts a batch — two requests, CFG on one, a LoRA, image-to-image, three
images — and resumes it in a new Python process from the bytes alone: the images and every
later checkpoint must equal the uninterrupted run's, so no state hides in memory. Checkpoints
are per request, so a request also resumes alone from what its batch wrote.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from auraserve.core.engine_options import EngineOptions
from auraserve.core.lora import LoraSpec, available_loras
from auraserve.core.request import GenerationRequest
from auraserve.engine.checkpoint import CheckpointMismatch, SamplerState
from auraserve.engine.fleet import FleetEngine
from auraserve.engine.lora import LoraOptions
from auraserve.engine.parallel import GroupEngine
from auraserve.engine.pipeline import PREVIEW_SIZE, AuraFlowEngine
from auraserve.engine.tiny import build_tiny_pipeline
from tests.engine.conftest import make_small_request
from tests.engine.test_lora import save_adapter

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt-loras")
    save_adapter(root / "style", rank=4, alpha=8, seed=1)
    return root


def build_engine(lora_root: Path | None = None, **options: Any) -> AuraFlowEngine:
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    lora = (
        LoraOptions(registry=lambda: available_loras(lora_root), max_rank=8)
        if lora_root is not None
        else None
    )
    return AuraFlowEngine(
        pipe,
        description="tiny",
        is_test_model=True,
        options=EngineOptions(**options) if options else None,
        lora=lora,
    )


def input_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.stack([x * 4, y * 4, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    pixels[16:48, 16:48] = (250, 30, 30)
    return Image.fromarray(pixels)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def batch() -> list[GenerationRequest]:
    """CFG + LoRA + image-to-image, two requests and three images, a stochastic multistep
    sampler (history and noise both in the checkpoint). Strength 0.8 runs 4 of 5 steps."""
    shared: dict[str, Any] = {
        "steps": 5,
        "sampler": "dpmpp_2m_sde",
        "scheduler": "karras",
        "image": _data_uri(input_image()),
        "strength": 0.8,
    }
    loras = (LoraSpec(name="style", scale=0.8),)
    first = make_small_request(SIZE, guidance_scale=4.5, num_images=2, seed=5, **shared)
    second = make_small_request(SIZE, guidance_scale=1.0, seed=77, prompt="a red box", **shared)
    return [r.model_copy(update={"loras": loras}) for r in (first, second)]


def _pixels(result_images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image) for image in result_images]


# Run by the test below in a fresh interpreter: argv = lora_root, work dir.
_RESUME_SCRIPT = """
import json, sys
from pathlib import Path
from tests.engine.test_pipeline_checkpoint import batch, build_engine, input_image

lora_root, work = Path(sys.argv[1]), Path(sys.argv[2])
engine = build_engine(lora_root)
later, steps = [], []
results = engine.generate(
    batch(),
    init_images=[input_image(), input_image()],
    checkpoint_every_steps=1,
    on_checkpoint=lambda r, data: later.append((r, data)),
    on_step=lambda step, total: steps.append(step),
    resume_from=[(work / f"checkpoint-{r}").read_bytes() for r in range(2)],
)
for r in range(2):
    for i, data in enumerate(d for rr, d in later if rr == r):
        (work / f"later-{r}-{i}").write_bytes(data)
for r, result in enumerate(results):
    for i, image in enumerate(result.images):
        image.save(work / f"image-{r}-{i}.png")
(work / "steps.json").write_text(json.dumps(steps))
"""


def test_a_batch_resumes_in_a_new_process_bit_for_bit(lora_root: Path, tmp_path: Path) -> None:
    engine = build_engine(lora_root)
    checkpoints: dict[tuple[int, int], bytes] = {}  # (step, request) → bytes

    def keep(r: int, data: bytes) -> None:
        checkpoints[SamplerState.from_bytes(data).step, r] = data

    results = engine.generate(
        batch(),
        init_images=[input_image(), input_image()],
        checkpoint_every_steps=1,
        on_checkpoint=keep,
    )
    assert sorted(checkpoints) == [(s, r) for s in (1, 2, 3) for r in (0, 1)]
    for r in (0, 1):
        (tmp_path / f"checkpoint-{r}").write_bytes(checkpoints[2, r])

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_RESUME_SCRIPT), str(lora_root), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    assert json.loads((tmp_path / "steps.json").read_text()) == [3, 4]
    for r in (0, 1):  # latents, history, noise: byte for byte
        assert (tmp_path / f"later-{r}-0").read_bytes() == checkpoints[3, r]
        assert not (tmp_path / f"later-{r}-1").exists()  # none after the last step
    for r, result in enumerate(results):
        assert len(result.images) == batch()[r].num_images
        for i, image in enumerate(result.images):
            resumed = np.asarray(Image.open(tmp_path / f"image-{r}-{i}.png"))
            assert np.array_equal(resumed, np.asarray(image)), (r, i)


def _t2i(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {"steps": 4, "sampler": "euler_ancestral", "seed": 3}
    fields.update(overrides)
    return make_small_request(SIZE, **fields)


@pytest.fixture(scope="module")
def plain_engine() -> AuraFlowEngine:
    return build_engine()


def test_resume_from_any_checkpoint_gives_the_same_images(plain_engine: AuraFlowEngine) -> None:
    request = _t2i(num_images=2)
    checkpoints: list[bytes] = []
    [reference] = plain_engine.generate(
        [request], checkpoint_every_steps=1, on_checkpoint=lambda r, data: checkpoints.append(data)
    )
    assert len(checkpoints) == 3
    for data in checkpoints:
        [resumed] = plain_engine.generate([request], resume_from=[data])
        pairs = zip(_pixels(resumed.images), _pixels(reference.images), strict=True)
        assert all(np.array_equal(a, b) for a, b in pairs)
    every_other: list[bytes] = []
    plain_engine.generate(
        [request], checkpoint_every_steps=2, on_checkpoint=lambda r, d: every_other.append(d)
    )
    assert every_other == [checkpoints[1]]


def test_a_request_resumes_alone_from_what_its_batch_wrote(plain_engine: AuraFlowEngine) -> None:
    """A takeover need not rebuild the batch: each request's checkpoint is its own rows."""
    first, second = _t2i(seed=3), _t2i(seed=8, guidance_scale=2.0, prompt="a boat")
    written: dict[int, list[bytes]] = {0: [], 1: []}
    batch_results = plain_engine.generate(
        [first, second],
        checkpoint_every_steps=1,
        on_checkpoint=lambda r, data: written[r].append(data),
    )
    [alone] = plain_engine.generate([second], resume_from=[written[1][1]])
    assert np.array_equal(_pixels(alone.images)[0], _pixels(batch_results[1].images)[0])
    with pytest.raises(CheckpointMismatch, match="same step"):
        plain_engine.generate([first, second], resume_from=[written[0][0], written[1][1]])
    with pytest.raises(CheckpointMismatch, match="other request"):
        plain_engine.generate([second, first], resume_from=[written[0][1], written[1][1]])
    with pytest.raises(ValueError, match="one checkpoint per request"):
        plain_engine.generate([first, second], resume_from=[written[0][1]])
    # A cancelled request gets no more checkpoints.
    late: list[int] = []
    plain_engine.generate(
        [first, second],
        checkpoint_every_steps=1,
        on_checkpoint=lambda r, data: late.append(r),
        cancelled=lambda: {0},
    )
    assert late == [1, 1, 1]


def test_a_checkpoint_of_another_request_is_refused(plain_engine: AuraFlowEngine) -> None:
    checkpoints: list[bytes] = []
    plain_engine.generate(
        [_t2i()], checkpoint_every_steps=1, on_checkpoint=lambda r, d: checkpoints.append(d)
    )
    for other in (_t2i(seed=4), _t2i(prompt="something else"), _t2i(guidance_scale=2.0)):
        with pytest.raises(CheckpointMismatch, match="other request"):
            plain_engine.generate([other], resume_from=checkpoints[:1])
    # Output encoding is not part of the latents: such a change still resumes.
    plain_engine.generate([_t2i(output_format="jpeg")], resume_from=checkpoints[:1])


def test_step_cache_batches_write_no_checkpoint_and_refuse_resume(
    plain_engine: AuraFlowEngine,
) -> None:
    cached = build_engine(step_cache="fbcache", cache_threshold=0.5, cache_warmup=0)
    written: list[bytes] = []
    cached.generate(
        [_t2i()], checkpoint_every_steps=1, on_checkpoint=lambda r, d: written.append(d)
    )
    assert written == []
    plain: list[bytes] = []
    plain_engine.generate(
        [_t2i()], checkpoint_every_steps=1, on_checkpoint=lambda r, d: plain.append(d)
    )
    with pytest.raises(CheckpointMismatch, match="step cache"):
        cached.generate([_t2i()], resume_from=plain[:1])
    # An exact job runs without the cache, so it checkpoints and resumes as usual.
    exact = _t2i(exact=True)
    cached.generate([exact], checkpoint_every_steps=1, on_checkpoint=lambda r, d: written.append(d))
    assert len(written) == 3
    cached.generate([exact], resume_from=written[:1])


def test_previews_come_per_image_at_the_asked_steps(plain_engine: AuraFlowEngine) -> None:
    seen: list[tuple[int, list[list[bytes]]]] = []
    plain_engine.generate(
        [_t2i(num_images=2, steps=5)],
        preview_every_steps=2,
        on_preview=lambda step, previews: seen.append((step, previews)),
    )
    assert [step for step, _ in seen] == [2, 4]
    for _, previews in seen:
        assert len(previews) == 1 and len(previews[0]) == 2
        image = Image.open(io.BytesIO(previews[0][0]))
        assert image.format == "JPEG"
        assert max(image.size) == min(PREVIEW_SIZE, SIZE)


def test_a_fleet_passes_checkpoints_through_and_a_parallel_group_says_it_cannot(
    plain_engine: AuraFlowEngine,
) -> None:
    fleet = FleetEngine({"auraflow-v0-3": plain_engine})
    assert fleet.supports_checkpoints
    written: list[bytes] = []
    fleet.generate([_t2i()], checkpoint_every_steps=2, on_checkpoint=lambda r, d: written.append(d))
    assert [SamplerState.from_bytes(data).step for data in written] == [2]
    assert GroupEngine.supports_checkpoints is False
