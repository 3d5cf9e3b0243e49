"""The canonical request: every rule once, errors in the dialect's words."""

from __future__ import annotations

import pytest

from auraserve.core.jobs import split_request_id
from auraserve.core.presets import default_presets
from auraserve.core.request import (
    GenerationRequest,
    bounds,
    build_request,
    check_one_batch,
    map_fields,
)
from auraserve.errors import InvalidParameter
from tests.batch_cases import IMAGE_URL, PER_BATCH, PER_BATCH_WITH_IMAGE, PER_ROW, changed

PRESET = default_presets()["auraflow-v0-3"]


def _build(**fields: object):
    return build_request({"prompt": "p", **fields}, model="auraflow-v0-3", preset=PRESET)


@pytest.mark.parametrize(
    ("given", "rounded"),
    [(512, 512), (520, 528), (1000, 1008), (1023, 1024), (2047, 2048), (777, 784)],
)
def test_sizes_round_to_the_nearest_multiple_of_16(given: int, rounded: int) -> None:
    request = _build(width=given, height=given)
    assert request.width == rounded
    if given == rounded:
        assert request.warnings == ()
    else:
        assert request.warnings == (
            f"width {given} was rounded to {rounded} (sizes are multiples of 16)",
            f"height {given} was rounded to {rounded} (sizes are multiples of 16)",
        )


def test_a_rounded_size_is_noted_in_the_dialects_words_and_never_taken_from_a_client() -> None:
    request = build_request(
        {"prompt": "p", "width": 1000, "height": "1024", "warnings": ["forged"]},
        model="auraflow-v0-3",
        preset=PRESET,
        names={"width": "size", "height": "size"},
    )
    assert request.warnings == ("size: width 1000 was rounded to 1008 (sizes are multiples of 16)",)
    # A stored request keeps its notes through a round trip (jobs re-validate on read).
    assert type(request).model_validate_json(request.model_dump_json()) == request


def test_preset_defaults_fill_absent_fields_and_seed_is_random() -> None:
    req = _build()
    assert (req.width, req.height, req.steps, req.guidance_scale, req.shift) == (
        1024,
        1024,
        25,
        3.5,
        1.73,
    )
    seeds = {_build().seed for _ in range(5)}
    assert len(seeds) > 1


def test_image_i_uses_seed_plus_i() -> None:
    assert _build(seed=10, num_images=3).seeds == [10, 11, 12]


def test_price_scales_with_pixels_and_steps_rounding_up_per_image() -> None:
    assert _build(steps=25).price(PRESET) == 100
    assert _build(steps=50).price(PRESET) == 200
    assert _build(width=512, height=512, steps=25).price(PRESET) == 25
    assert _build(width=512, height=512, steps=1, num_images=3).price(PRESET) == 3  # ceil(1) each
    free = PRESET.model_copy(update={"price_per_image": 0})
    assert _build().price(free) == 0


def test_errors_name_the_dialect_field_and_the_range() -> None:
    with pytest.raises(InvalidParameter) as err:
        build_request(
            {"prompt": "p", "steps": 0},
            model="m",
            preset=PRESET,
            names={"steps": "num_inference_steps"},
        )
    assert err.value.field == "num_inference_steps"
    assert "from 1 to 100" in err.value.message


def test_batch_key_groups_only_what_can_share_a_forward() -> None:
    a, b = _build(seed=1, guidance_scale=2), _build(seed=2, guidance_scale=7, prompt="other")
    assert a.batch_key == b.batch_key
    assert _build(steps=30).batch_key != a.batch_key
    assert _build(sampler="heun").batch_key != a.batch_key


def test_request_ids_split_back() -> None:
    rid = "auraflow-v0-3-512_019d0000-0000-7000-8000-000000000000"
    assert split_request_id(rid) == ("auraflow-v0-3-512", rid.split("_")[1])
    assert split_request_id("nounderscore") is None
    assert split_request_id("m_short") is None


def test_dialect_fields_map_once_and_dialect_defaults_come_before_the_preset() -> None:
    fields = map_fields(
        {"cfg": 7, "unknown": 1, "prompt": "p"}, {"cfg": "guidance_scale", "prompt": "prompt"}
    )
    assert fields == {"guidance_scale": 7, "prompt": "p"}
    req = build_request(
        fields, model="m", preset=PRESET, defaults={"guidance_scale": 5.0, "steps": 30}
    )
    assert (req.guidance_scale, req.steps, req.width) == (7, 30, PRESET.width)


def test_bounds_are_the_declared_constraints() -> None:
    assert bounds("steps") == (1, 100)
    assert bounds("width") == (512, 2048)


# --- batch compatibility: one definition (GenerationRequest.batch_key) ---------------------


def test_every_field_is_either_per_row_or_per_batch() -> None:
    tables = [PER_ROW, PER_BATCH, PER_BATCH_WITH_IMAGE]
    assert sorted(name for table in tables for name in table) == sorted(
        GenerationRequest.model_fields
    )


@pytest.mark.parametrize(("field", "value"), PER_ROW.items())
def test_a_per_row_field_keeps_the_batch_key(field: str, value: object) -> None:
    base = _build(seed=1)
    assert changed(base, **{field: value}).batch_key == base.batch_key
    check_one_batch([base, changed(base, **{field: value})])


@pytest.mark.parametrize(("field", "value"), PER_BATCH.items())
def test_a_per_batch_field_changes_the_batch_key(field: str, value: object) -> None:
    base = _build(seed=1)
    other = changed(base, **{field: value})
    assert other.batch_key != base.batch_key
    with pytest.raises(ValueError, match="share its batch key"):
        check_one_batch([base, other])


@pytest.mark.parametrize(("field", "value"), PER_BATCH_WITH_IMAGE.items())
def test_with_an_image_strength_and_its_size_change_the_key(field: str, value: object) -> None:
    base = _build(image=IMAGE_URL, strength=0.8, width=1024, height=1024)  # size given
    assert changed(base, **{field: value}).batch_key != base.batch_key
    assert changed(base, image="https://example.com/b.png").batch_key == base.batch_key
    plain = _build()
    assert changed(plain, **{field: value}).batch_key == plain.batch_key  # no image: unused
