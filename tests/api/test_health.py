"""/healthz, /readyz and /health against a live server, on both stores."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from auraserve.config import Settings
from auraserve.runtime import Runtime
from auraserve.store.migrations import HEAD_REVISION
from tests.conftest import LiveServer


class SlowWarmupEngine:
    """The tiny engine, except that its warm-up lasts until the test releases it."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def warmup(self, sizes: Sequence[tuple[int, int]], steps: int = 2) -> float:
        self.release.wait(30)
        return 0.0


@pytest.fixture
def warming_server(settings: Settings, tiny_engine: Any) -> Iterator[tuple[LiveServer, Any]]:
    runtime = Runtime.open(settings.model_copy(update={"warmup_sizes": ["256x256"]}))
    engine = SlowWarmupEngine(tiny_engine)
    runtime.engine = engine  # type: ignore[assignment]
    runtime.start_worker()
    live = LiveServer(runtime).start()
    yield live, engine
    engine.release.set()
    live.stop()
    runtime.close()


def test_healthz_answers_while_serving(api_only_server: LiveServer, client: httpx.Client) -> None:
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


def test_an_api_only_process_is_ready_when_the_store_is(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ready"
    assert body["failed"] == []
    assert set(body["checks"]) == {"store", "schema"}  # no in-process worker to wait for


def test_not_ready_while_the_worker_warms_up(
    warming_server: tuple[LiveServer, SlowWarmupEngine],
) -> None:
    live, engine = warming_server
    with httpx.Client(base_url=live.url, timeout=10) as client:
        warming = client.get("/readyz")
        assert warming.status_code == 503
        assert warming.json()["failed"] == ["workers"]
        assert "starting" in warming.json()["checks"]["workers"]["detail"]
        # The older /health stays 200 (compatibility) and says "starting".
        assert client.get("/health").json()["status"] == "starting"
        assert client.get("/healthz").status_code == 200

        engine.release.set()
        for _ in range(100):
            ready = client.get("/readyz")
            if ready.status_code == 200:
                break
            threading.Event().wait(0.05)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["workers"]["ok"] is True


def test_not_ready_when_the_schema_is_behind(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    db = api_only_server.runtime.db
    with db.write() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    try:
        resp = client.get("/readyz")
        assert resp.status_code == 503
        body = resp.json()
        assert body["failed"] == ["schema"]
        assert "auraserve db upgrade" in body["checks"]["schema"]["detail"]
    finally:
        with db.write() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": HEAD_REVISION})


def test_every_response_carries_a_request_id(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    assert (
        client.get("/healthz", headers={"X-Request-Id": "lb-123"}).headers["x-request-id"]
        == "lb-123"
    )
    # An id that is not a sane token is replaced rather than logged as sent.
    odd = client.get("/healthz", headers={"X-Request-Id": "a b\tc"}).headers["x-request-id"]
    assert odd != "a b\tc" and len(odd) == 32
