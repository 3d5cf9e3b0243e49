"""The S3 server for the media tests: one per session (starting moto takes a moment); each
test gets its own bucket, so tests never see each other's objects."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from auraserve.config import Settings
from tests.s3_server import S3Server, start_s3_server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.make_bucket()


def with_settings(settings: Settings, **overrides: Any) -> Settings:
    """`settings` with `overrides` applied and validated (model_copy would skip validation)."""
    return Settings.model_validate({**settings.model_dump(), **overrides})
