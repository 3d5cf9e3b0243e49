"""Fuzzing the body parsers and `build_request`: any input ends in a request or a 4xx error.

Hypothesis drives the search (it mutates towards inputs that reach new branches of the property
and shrinks what fails). The run is bounded by time, `AURASERVE_FUZZ_SECONDS` (10 s by default,
so CI stays short); a longer run is one environment variable away.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from auraserve.api.body import parse_json_object, read_numbers
from auraserve.api.dialect import Dialect
from auraserve.api.dialects.openai import OPENAI
from auraserve.api.dialects.queue import QUEUE
from auraserve.api.dialects.sync import SYNC, read_fields
from auraserve.config import Settings, load_settings
from auraserve.errors import AuraserveError

FUZZ_SECONDS = float(os.environ.get("AURASERVE_FUZZ_SECONDS", "10"))
DIALECTS: list[Dialect] = [QUEUE, SYNC, OPENAI]
FIELDS = sorted({name for d in DIALECTS for name in d.fields} | {"size", "quality", "model"})

_numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 1e308, -0.0, 0.5, 3.0]),
)
_strings = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["3", "3.0", "1_0", " 7 ", "1e3", "true", "NaN", "inf", "0x10", "", "\x00"]),
    st.sampled_from(["1024x1024", "256x256", "auto", "hd", "standard", "euler", "png", "webp"]),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, _strings)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), _values, max_size=12)


def _body_bytes() -> st.SearchStrategy[bytes]:
    as_json = _bodies.map(lambda b: json.dumps(b).encode())
    raw_edits = st.tuples(as_json, st.integers(min_value=0, max_value=400), st.binary(max_size=8))
    spliced = raw_edits.map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :])
    deep = st.integers(min_value=1, max_value=3000).map(
        lambda n: b'{"prompt":"a","x":' + b"[" * n + b"]" * n + b"}"
    )
    long_int = st.integers(min_value=1, max_value=6000).map(
        lambda n: b'{"prompt":"a","seed":' + b"7" * n + b"}"
    )
    return st.one_of(as_json, spliced, deep, long_int, st.binary(max_size=200))


@pytest.fixture(scope="module")
def fuzz_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(data_dir=tmp_path_factory.mktemp("fuzz"), model="tiny")


def _refused_as_client_error(exc: AuraserveError) -> None:
    assert 400 <= exc.status < 500, f"{type(exc).__name__} {exc.status}: {exc.message}"


def _build_everywhere(settings: Settings, data: dict[str, Any]) -> None:
    for dialect in DIALECTS:
        try:
            fields = dialect.canonical(read_numbers(data, dialect))
            dialect.build(settings, settings.default_preset, fields)
        except AuraserveError as exc:
            _refused_as_client_error(exc)


def _form_request(body: bytes, content_type: bytes) -> Request:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/aura-flow",
        "query_string": b"",
        "headers": [(b"content-type", content_type)],
    }
    return Request(scope, receive)


def _run_for(seconds: float, run_once: Any) -> int:
    """Call a @given test repeatedly (fresh random seeds each time) until `seconds` pass."""
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        run_once()
        rounds += 1
    return rounds


_fuzz = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def test_json_bodies_never_fail_as_server_errors(fuzz_settings: Settings) -> None:
    @_fuzz
    @given(_body_bytes())
    def once(raw: bytes) -> None:
        try:
            data = parse_json_object(raw)
        except AuraserveError as exc:
            _refused_as_client_error(exc)
            return
        _build_everywhere(fuzz_settings, data)

    assert _run_for(FUZZ_SECONDS * 0.6, once) >= 1


def test_form_bodies_never_fail_as_server_errors(fuzz_settings: Settings) -> None:
    form_values = st.dictionaries(st.sampled_from(FIELDS), _strings, max_size=10)
    urlencoded = form_values.map(
        lambda d: "&".join(f"{k}={v}" for k, v in d.items()).encode("utf-8", "surrogatepass")
    )
    content_types = st.sampled_from(
        [
            b"application/x-www-form-urlencoded",
            b"multipart/form-data; boundary=xyz",
            b"multipart/form-data",
        ]
    )

    @_fuzz
    @given(st.one_of(urlencoded, st.binary(max_size=300)), content_types)
    def once(body: bytes, content_type: bytes) -> None:
        async def read() -> dict[str, Any]:
            return await read_fields(_form_request(body, content_type))

        try:
            data = asyncio.run(read())
        except AuraserveError as exc:
            _refused_as_client_error(exc)
            return
        _build_everywhere(fuzz_settings, data)

    assert _run_for(FUZZ_SECONDS * 0.4, once) >= 1
