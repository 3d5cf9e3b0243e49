"""One record per sampler: the Literal the API validates with, the names it lists and the docs
all agree with `SAMPLER_SPECS` (the engine's side is tests/engine/test_sampling.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest

from auraserve.core.samplers import SAMPLER_SPECS, SAMPLERS, SamplerName, sampler_spec

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_literal_and_the_records_name_the_same_samplers_in_order() -> None:
    assert get_args(SamplerName) == tuple(spec.name for spec in SAMPLER_SPECS) == SAMPLERS
    assert len(set(SAMPLERS)) == len(SAMPLERS) == 14


def test_a_record_is_found_by_its_name() -> None:
    for spec in SAMPLER_SPECS:
        assert sampler_spec(spec.name) is spec
        assert spec.model_calls_per_step >= 1
    assert sampler_spec("heun").model_calls_per_step == 2
    assert sampler_spec("dpmpp_2m_sde").stochastic
    with pytest.raises(ValueError, match="unknown sampler 'euler_a'"):
        sampler_spec("euler_a")


def test_the_api_reference_lists_every_sampler() -> None:
    row = re.search(
        r"^\| `sampler` \|[^|]*\|(?P<names>[^|]*)\|", (DOCS / "api.md").read_text(), re.M
    )
    assert row is not None
    assert tuple(name.strip() for name in row["names"].split(",")) == SAMPLERS
