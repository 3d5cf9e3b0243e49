"""The dialect seam: each dialect's documented body is derived from the canonical request,
and each dialect renders the one error tree in its own shape."""

from __future__ import annotations

from typing import Any

import pytest

from auraserve.api.dialect import Dialect, Problem
from auraserve.api.dialects.openai import OPENAI, ImageGenerationBody
from auraserve.api.dialects.queue import QUEUE, QueueSubmitBody
from auraserve.api.dialects.sync import SYNC, SyncBody
from auraserve.core.request import GenerationRequest, bounds
from auraserve.core.samplers import SAMPLERS
from auraserve.errors import InsufficientBalance, InvalidParameter, RateLimited


def _prop(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """The non-null branch of an optional property."""
    prop = schema["properties"][name]
    options = [o for o in prop.get("anyOf", [prop]) if o.get("type") != "null"]
    assert len(options) == 1
    return dict(options[0])


@pytest.mark.parametrize(
    ("body", "dialect"), [(QueueSubmitBody, QUEUE), (SyncBody, SYNC), (ImageGenerationBody, OPENAI)]
)
def test_bodies_carry_the_canonical_ranges_under_the_dialect_names(
    body: Any, dialect: Dialect
) -> None:
    schema = body.model_json_schema()
    canonical = GenerationRequest.model_json_schema()["properties"]
    for public, name in dialect.fields.items():
        prop = _prop(schema, public)
        for key in ("minimum", "maximum", "minLength", "maxLength", "enum"):
            assert prop.get(key) == canonical[name].get(key), (public, key)
    assert schema["required"] == ["prompt"]


def test_queue_steps_maximum_is_the_canonical_one() -> None:
    steps = _prop(QueueSubmitBody.model_json_schema(), "num_inference_steps")
    assert steps["maximum"] == bounds("steps")[1] == 100
    assert _prop(SyncBody.model_json_schema(), "sampler")["enum"] == list(SAMPLERS)


def test_each_dialect_renders_insufficient_balance_its_own_way() -> None:
    exc = InsufficientBalance()
    queue = QUEUE.problem(exc)
    assert queue.status == 402
    assert QUEUE.error_body(queue) == {"error": "Insufficient Balance", "message": exc.message}
    assert SYNC.problem(exc).status == 406
    openai = OPENAI.problem(exc)
    assert openai.status == 429
    assert OPENAI.error_body(openai)["error"]["code"] == "insufficient_quota"


def test_fields_headers_and_extra_reach_the_body() -> None:
    bad = InvalidParameter(field="num_inference_steps", message="num_inference_steps: too many")
    assert QUEUE.error_body(QUEUE.problem(bad))["field"] == "num_inference_steps"
    assert OPENAI.error_body(OPENAI.problem(bad))["error"]["param"] == "num_inference_steps"
    limited = RateLimited("slow down", retry_after=7)
    problem: Problem = QUEUE.problem(limited)
    assert problem.status == 429 and problem.headers["Retry-After"] == "7"


def test_model_resolution_is_one_rule(settings: Any) -> None:
    assert OPENAI.resolve_model(settings, "dall-e-3") == settings.default_preset
    assert OPENAI.resolve_model(settings, None) == settings.default_preset
    assert QUEUE.resolve_model(settings, "auraflow-v0-3-512") == "auraflow-v0-3-512"
    with pytest.raises(InvalidParameter) as err:
        OPENAI.resolve_model(settings, "nope")
    assert err.value.field == "model"
