"""The helpers that let the OpenAPI document state the server's own rules."""

from __future__ import annotations

import random
import re

import pytest

from auraserve.api.dialects.openai import _size_pattern, parse_size
from auraserve.api.openapi import TEXT_PATTERNS, int_range_pattern
from auraserve.core.request import GenerationRequest
from auraserve.errors import InvalidParameter


@pytest.mark.parametrize(("low", "high"), [(0, 9), (5, 123), (1, 1), (99, 100), (512, 2048)])
def test_int_range_pattern_matches_exactly_the_range(low: int, high: int) -> None:
    pattern = re.compile(f"^{int_range_pattern(low, high)}$")
    for value in range(0, 3000):
        assert bool(pattern.match(str(value))) == (low <= value <= high), value


def _server_accepts_size(value: str) -> bool:
    try:
        parse_size(value)
    except InvalidParameter:
        return False
    return True


def test_the_size_pattern_is_parse_sizes_rule() -> None:
    pattern = re.compile(_size_pattern())
    rng = random.Random(7)
    samples = ["auto", "auto\n", " 1024 X 1024 ", "2048×2048", "01024x1024", "0001024x1024"]
    samples += [f"{'0' * rng.randint(0, 3)}{rng.randint(0, 2500)}x{rng.randint(0, 2500)}"]
    samples += [
        f"{rng.randint(400, 2100)}{rng.choice('xX×')}{rng.randint(400, 2100)}" for _ in range(2000)
    ]
    for value in samples:
        assert bool(pattern.search(value)) == _server_accepts_size(value), value


@pytest.mark.parametrize(
    ("prompt", "valid"),
    [("a cat", True), (" x ", True), ("", False), (" \t\n\u3000", False), ("a\x00b", False)],
)
def test_the_prompt_pattern_is_the_validators_rule(prompt: str, valid: bool) -> None:
    from pydantic import ValidationError

    assert bool(re.search(TEXT_PATTERNS["prompt"], prompt)) == valid
    try:
        GenerationRequest.model_validate(
            {
                "model": "m",
                "prompt": prompt,
                "guidance_scale": 1,
                "steps": 1,
                "width": 512,
                "height": 512,
                "seed": 0,
                "shift": 1,
                "sampler": "euler",
                "scheduler": "normal",
                "output_format": "png",
                "output_quality": 80,
            }
        )
    except ValidationError:
        assert not valid
    else:
        assert valid


# The reference pages' numbers and our own jargon, which users cannot know.
OLD_NAMES = re.compile(r"seed[ -]?00\d|dialect|async queue", re.IGNORECASE)


def test_the_document_names_the_apis_as_users_know_them(runtime: object, settings: object) -> None:
    from auraserve.api.app import create_app

    document = create_app(runtime).openapi()  # type: ignore[arg-type]
    declared = {tag["name"]: tag.get("description", "") for tag in document["tags"]}
    assert {"Queue API", "Sync API", "OpenAI Images"} <= set(declared)
    used = {
        tag
        for methods in document["paths"].values()
        for operation in methods.values()
        for tag in operation.get("tags", [])
    }
    assert {"Queue API", "Sync API", "OpenAI Images"} <= used
    for name, description in declared.items():
        assert not OLD_NAMES.search(name) and not OLD_NAMES.search(description), name
    for path, methods in document["paths"].items():
        for operation in methods.values():
            for key in ("summary", "description"):
                assert not OLD_NAMES.search(operation.get(key, "")), (path, key)
    assert not OLD_NAMES.search(document["info"]["description"])
