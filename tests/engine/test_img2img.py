"""Image-to-image on the tiny model, tested against its mathematics (engine.img2img)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from auraserve.core.image_input import steps_to_run
from auraserve.core.request import GenerationRequest
from auraserve.engine.img2img import encode_image, start_sigmas
from auraserve.engine.pipeline import AuraFlowEngine
from auraserve.errors import UnsupportedRequest
from tests.engine.conftest import make_small_request

SIZE = 64


def _input_image() -> Image.Image:
    """A smooth gradient with a square: structure the VAE round trip keeps recognisably."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.stack([x * 4, y * 4, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    pixels[16:48, 16:48] = (250, 30, 30)
    return Image.fromarray(pixels)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _request(**overrides: object) -> GenerationRequest:
    return make_small_request(SIZE, guidance_scale=1.0, **overrides)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    ("total", "strength", "expected"),
    [(10, 1.0, 10), (10, 0.0, 0), (10, 0.55, 6), (5, 0.5, 3), (4, 0.3, 1), (3, 0.1, 0)],
)
def test_steps_to_run_rounds_half_up(total: int, strength: float, expected: int) -> None:
    assert steps_to_run(total, strength) == expected
    sigmas = torch.linspace(1, 0, total + 1)
    assert len(start_sigmas(sigmas, strength)) == expected + 1
    assert float(start_sigmas(sigmas, strength)[-1]) == 0.0


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_strength_one_is_text_to_image_with_the_same_seed(
    engine: AuraFlowEngine, sampler: str
) -> None:
    plain = _request(sampler=sampler, steps=3, seed=7)
    img2img = plain.model_copy(update={"image": _data_uri(_input_image()), "strength": 1.0})
    [t2i] = engine.generate([plain])
    [i2i] = engine.generate([img2img], init_images=[_input_image()])
    assert np.array_equal(_pixels(t2i.images[0]), _pixels(i2i.images[0]))


def test_strength_zero_is_the_vae_round_trip(engine: AuraFlowEngine) -> None:
    steps: list[tuple[int, int]] = []
    request = _request(image=_data_uri(_input_image()), strength=0.0, seed=3)
    [result] = engine.generate(
        [request], init_images=[_input_image()], on_step=lambda s, t: steps.append((s, t))
    )
    with torch.inference_mode():
        expected = engine._decode_one(encode_image(engine.pipe, _input_image(), SIZE, SIZE))
    assert steps == []
    # Equal up to the last bit's rounding: the engine decodes through its batched path, whose
    # float kernels may round one channel of one pixel the other way (seen: 1 of 12,288 values
    # off by 1 on one machine). Any denoising step would move the whole image, far past 1.
    difference = np.abs(_pixels(result.images[0]) - _pixels(expected))
    assert difference.max() <= 1
    assert np.count_nonzero(difference) <= 0.001 * difference.size


@pytest.mark.parametrize(("steps", "strength", "runs"), [(5, 0.5, 3), (4, 0.3, 1), (6, 0.8, 5)])
def test_intermediate_strength_runs_the_documented_steps(
    engine: AuraFlowEngine, steps: int, strength: float, runs: int
) -> None:
    calls: list[tuple[int, int]] = []
    request = _request(image=_data_uri(_input_image()), strength=strength, steps=steps)
    engine.generate(
        [request], init_images=[_input_image()], on_step=lambda s, t: calls.append((s, t))
    )
    assert calls == [(i, runs) for i in range(1, runs + 1)]


def test_the_input_shapes_the_result(engine: AuraFlowEngine) -> None:
    """At a low strength the result stays nearer the input's round trip than text-to-image
    does (the tiny model's random VAE does not reproduce the input itself)."""
    source = _input_image()
    plain = _request(seed=11, steps=4)
    img2img = plain.model_copy(update={"image": _data_uri(source), "strength": 0.25})
    kept = plain.model_copy(update={"image": _data_uri(source), "strength": 0.0})
    [t2i] = engine.generate([plain])
    [i2i] = engine.generate([img2img], init_images=[source])
    [trip] = engine.generate([kept], init_images=[source])
    target = _pixels(trip.images[0])
    assert (
        np.abs(_pixels(i2i.images[0]) - target).mean()
        < np.abs(_pixels(t2i.images[0]) - target).mean()
    )


def test_batching_never_changes_an_image(engine: AuraFlowEngine) -> None:
    uri = _data_uri(_input_image())
    one = _request(image=uri, strength=0.6, seed=21, num_images=2, sampler="euler_ancestral")
    other = _request(image=uri, strength=0.6, seed=99, sampler="euler_ancestral")
    [alone] = engine.generate([one], init_images=[_input_image()])
    together = engine.generate([one, other], init_images=[_input_image(), _input_image()])
    assert [_pixels(i).tolist() for i in alone.images] == [
        _pixels(i).tolist() for i in together[0].images
    ]
    assert alone.images[0].tobytes() != alone.images[1].tobytes()  # each image its own noise


def test_a_request_without_its_decoded_image_is_unsupported(engine: AuraFlowEngine) -> None:
    with pytest.raises(UnsupportedRequest, match="image"):
        engine.generate([_request(image=_data_uri(_input_image()), strength=0.5)])


def test_text_and_image_requests_never_share_a_batch(engine: AuraFlowEngine) -> None:
    with pytest.raises(ValueError, match="share its batch key"):
        engine.generate(
            [_request(), _request(image=_data_uri(_input_image()), strength=0.5)],
            init_images=[None, _input_image()],
        )
