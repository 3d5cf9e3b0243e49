"""Store outages on PostgreSQL: requests answer 503 with Retry-After in their dialect's
shape, never 500; each failure is logged once; the server recovers by itself.

Two outages, both against a real server on loopback: every server connection terminated
mid-load (`pg_terminate_backend`), and a database that stops answering. The shared PostgreSQL
cannot be stopped, so the server reaches it through a TCP forwarder this test starts and
stops (`TcpProxy`): stopped, it refuses connections and cuts the open ones, as a stopped
server's host does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from auraserve.config import Settings
from auraserve.runtime import Runtime
from auraserve.store.schema import accounts, jobs, ledger
from tests.conftest import BACKEND, LiveServer, free_port, make_tenant

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(BACKEND != "postgresql", reason="PostgreSQL outages: run on postgresql"),
]

QUEUE_SUBMIT = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
JOB_BODY = {"prompt": "a lighthouse", "num_inference_steps": 2, "expand_prompt": False}


class TcpProxy:
    """A TCP forwarder on loopback, in its own thread and event loop, that can be stopped
    (listener closed, open connections cut) and started again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> TcpProxy:
        self.thread.start()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> None:
        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self._serve, "127.0.0.1", self.port)

        self.server = self._run(listen())

    def stop(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()
                await self.server.wait_closed()
                self.server = None
            for writer in list(self.writers):
                writer.transport.abort()
            self.writers.clear()
            await asyncio.sleep(0.05)  # let the cut connections' pipes finish

        self._run(close())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


class Records(logging.Handler):
    """Every record of the loggers it is attached to (auraserve's and uvicorn's)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def unavailable(self) -> list[logging.LogRecord]:
        return [
            r
            for r in self.records
            if r.name == "auraserve.api.errors" and "database unavailable" in r.getMessage()
        ]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The load below submits as fast as the server takes it: without room, the account's queue
    limit (100) answers 429 mid-run, which is not what this module tests."""
    return settings.model_copy(update={"max_queued_per_account": 10**6})


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("auraserve", "uvicorn.error", "uvicorn")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield handler
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def _assert_money_consistent(database_url: str) -> None:
    """A refused submit reserved nothing: every reservation has its job, and each balance is
    its ledger's sum."""
    engine = create_engine(make_url(database_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            orphans = conn.execute(
                select(func.count())
                .select_from(ledger)
                .where(ledger.c.kind == "reserve", ledger.c.job_id.not_in(select(jobs.c.id)))
            ).scalar_one()
            assert orphans == 0
            reserves = conn.execute(
                select(func.count()).select_from(ledger).where(ledger.c.kind == "reserve")
            ).scalar_one()
            assert reserves == conn.execute(select(func.count()).select_from(jobs)).scalar_one()
            for account_id, balance in conn.execute(select(accounts.c.id, accounts.c.balance)):
                total = conn.execute(
                    select(func.coalesce(func.sum(ledger.c.balance_delta), 0)).where(
                        ledger.c.account_id == account_id
                    )
                ).scalar_one()
                assert balance == total, account_id
    finally:
        engine.dispose()


_COUNT_LOCK = threading.Lock()


def _load(url: str, headers: dict[str, str], stop: threading.Event, codes: Counter[int]) -> None:
    """Submit and poll in a loop, counting every status code (0: no answer at all)."""

    def count(code: int) -> None:
        with _COUNT_LOCK:  # four threads: `+=` on a Counter is not atomic
            codes[code] += 1

    with httpx.Client(base_url=url, timeout=30) as client:
        request_id: str | None = None
        while not stop.is_set():
            try:
                resp = client.post(QUEUE_SUBMIT, headers=headers, json=JOB_BODY)
                count(resp.status_code)
                if resp.status_code == 202:
                    request_id = resp.json()["request_id"]
                if request_id is not None:
                    poll = client.get(f"/v2/requests/status/{request_id}", headers=headers)
                    count(poll.status_code)
            except httpx.TransportError:
                count(0)


def test_terminated_connections_mid_load_give_no_500(
    server: LiveServer, settings: Settings, records: Records
) -> None:
    tenant = make_tenant(server.runtime, credits=10**9)
    stop = threading.Event()
    codes: Counter[int] = Counter()
    threads = [
        threading.Thread(target=_load, args=(server.url, tenant.headers, stop, codes))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    admin = create_engine(
        make_url(settings.database_url).set(drivername="postgresql+psycopg"),
        isolation_level="AUTOCOMMIT",
    )
    killed = 0
    try:
        time.sleep(0.5)
        with admin.connect() as conn:
            for _ in range(5):
                killed += len(
                    conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    ).all()
                )
                time.sleep(0.3)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        admin.dispose()
    print(f"terminated {killed} server connections; responses by status: {dict(codes)}")
    assert killed > 0
    assert set(codes) <= {200, 202, 503}, codes
    assert codes[202] > 0
    # Each refused request was logged once, on one line, without a traceback.
    logged = records.unavailable()
    assert len(logged) == codes[503]
    assert all(r.exc_info is None for r in logged)
    assert not [r for r in records.records if r.name.startswith("uvicorn")]
    # It serves again afterwards, by itself.
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post(QUEUE_SUBMIT, headers=tenant.headers, json=JOB_BODY).status_code == 202
    _assert_money_consistent(settings.database_url)


def _proxied(database_url: str, port: int) -> str:
    return make_url(database_url).set(host="127.0.0.1", port=port).render_as_string(False)


def test_a_stopped_database_gives_503_then_recovers(
    settings: Settings, tmp_path: Any, records: Records
) -> None:
    target = make_url(settings.database_url)
    with TcpProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
        proxied = settings.model_copy(
            update={"database_url": _proxied(settings.database_url, proxy.port)}
        )
        runtime = Runtime.open(proxied)
        live = LiveServer(runtime).start()
        try:
            tenant = make_tenant(runtime, credits=10**9)
            with httpx.Client(base_url=live.url, timeout=30) as client:
                first = client.post(QUEUE_SUBMIT, headers=tenant.headers, json=JOB_BODY)
                assert first.status_code == 202
                request_id = first.json()["request_id"]
                assert client.get("/readyz").status_code == 200

                proxy.stop()
                time.sleep(2.5)  # past the key cache: every request now needs the database
                refused = [
                    client.post(QUEUE_SUBMIT, headers=tenant.headers, json=JOB_BODY),
                    client.get(f"/v2/requests/status/{request_id}", headers=tenant.headers),
                    client.post(
                        "/v1/aura-flow",
                        headers={"x-api-key": tenant.key},
                        json={"prompt": "a lighthouse", "steps": 2},
                    ),
                    client.post(
                        "/v1/images/generations",
                        headers={"Authorization": f"Bearer {tenant.key}"},
                        json={"prompt": "a lighthouse"},
                    ),
                ]
                for resp in refused:
                    assert resp.status_code == 503, resp.text
                    assert int(resp.headers["Retry-After"]) >= 1
                queue_body, poll_body, sync_body, openai_body = (r.json() for r in refused)
                assert "database" in queue_body["message"]  # seed 002's {error, message}
                assert "database" in poll_body["message"]
                assert "database" in sync_body["message"]
                assert "database" in openai_body["error"]["message"]  # OpenAI's error object
                ready = client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["failed"][:1] == ["store"]
                assert client.get("/healthz").status_code == 200
                logged = records.unavailable()
                assert len(logged) == len(refused)
                assert all(r.exc_info is None for r in logged)
                assert not [r for r in records.records if r.name.startswith("uvicorn")]

                proxy.start()
                deadline = time.monotonic() + 15
                while True:
                    resp = client.post(QUEUE_SUBMIT, headers=tenant.headers, json=JOB_BODY)
                    if resp.status_code == 202 or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                assert resp.status_code == 202, resp.text
                assert client.get("/readyz").status_code == 200
                status = client.get(f"/v2/requests/status/{request_id}", headers=tenant.headers)
                assert status.status_code == 200
        finally:
            live.stop()
            runtime.close()
    _assert_money_consistent(settings.database_url)


# --- a 503 that tells the truth (issue 18, point 2) ------------------------------------------
# Without Idempotency-Keys: a client that resent after a 503 whose job existed paid twice.

SYNC_FORM = {"prompt": "a lighthouse", "steps": "1", "width": "512", "height": "512"}


def _jobs_of(database_url: str, account_id: str) -> list[Any]:
    engine = create_engine(make_url(database_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(jobs).where(jobs.c.account_id == account_id)))
    finally:
        engine.dispose()


def _charged_once(database_url: str, account_id: str) -> None:
    """Exactly one job, captured once; the balance is the ledger's sum."""
    made = _jobs_of(database_url, account_id)
    assert len(made) == 1, [r.id for r in made]
    engine = create_engine(make_url(database_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            kinds = [
                r.kind
                for r in conn.execute(
                    select(ledger.c.kind).where(ledger.c.account_id == account_id)
                )
            ]
    finally:
        engine.dispose()
    assert sorted(kinds) == ["capture", "grant", "reserve"], kinds
    _assert_money_consistent(database_url)


def _wait_for_a_job(database_url: str, account_id: str) -> None:
    deadline = time.monotonic() + 30
    while not _jobs_of(database_url, account_id):
        assert time.monotonic() < deadline, "the submit never wrote its job"
        time.sleep(0.05)


def _request_id(response: httpx.Response) -> str:
    """The job's public id: the body's, or the x-request-id that names a job (the other one
    is the HTTP request's id, for the logs)."""
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        if isinstance(body, dict) and "request_id" in body:
            return str(body["request_id"])
    return next(v for v in response.headers.get_list("x-request-id") if "_" in v)


class _Call(threading.Thread):
    """One HTTP request in the background; `response` once answered."""

    def __init__(self, url: str, path: str, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.url, self.path, self.kwargs = url, path, kwargs
        self.response: httpx.Response | None = None

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            self.response = client.post(self.path, **self.kwargs)

    def answer(self) -> httpx.Response:
        self.join(120)
        assert self.response is not None
        return self.response


def _proxied_server(
    settings: Settings, proxy: TcpProxy, **update: Any
) -> tuple[Runtime, LiveServer]:
    proxied = settings.model_copy(
        update={"database_url": _proxied(settings.database_url, proxy.port), **update}
    )
    runtime = Runtime.open(proxied)
    return runtime, LiveServer(runtime).start()


def test_a_sync_wait_rides_out_an_outage_and_answers_with_the_image(
    settings: Settings, tiny_engine: Any
) -> None:
    """The job is written, then the database goes away while the request waits for it: the
    request keeps waiting and answers with the image once it is back, charged once."""
    target = make_url(settings.database_url)
    with TcpProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
        runtime, live = _proxied_server(settings, proxy)
        try:
            tenant = make_tenant(runtime, credits=10**6)
            call = _Call(
                live.url, "/v1/aura-flow", headers={"x-api-key": tenant.key}, data=SYNC_FORM
            )
            call.start()
            _wait_for_a_job(settings.database_url, tenant.account_id)
            proxy.stop()
            time.sleep(3)  # the waiting request finds the store away, again and again
            proxy.start()
            runtime.engine = tiny_engine  # a worker runs the job once the store is back
            runtime.start_worker()
            response = call.answer()
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("image/")
        finally:
            live.stop()
            runtime.close()
    _charged_once(settings.database_url, tenant.account_id)


@pytest.mark.parametrize("dialect", ["sync", "openai"])
def test_an_outage_past_the_wait_limit_answers_a_503_that_names_the_request(
    settings: Settings, tiny_engine: Any, dialect: str
) -> None:
    """The store stays away past the sync wait: the 503 carries the request id and says how
    to fetch the result; a client that follows it gets the image and pays once."""
    target = make_url(settings.database_url)
    with TcpProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
        runtime, live = _proxied_server(settings, proxy, sync_timeout_seconds=4.0)
        try:
            tenant = make_tenant(runtime, credits=10**6)
            if dialect == "sync":
                call = _Call(
                    live.url, "/v1/aura-flow", headers={"x-api-key": tenant.key}, data=SYNC_FORM
                )
            else:
                call = _Call(
                    live.url,
                    "/v1/images/generations",
                    headers={"Authorization": f"Bearer {tenant.key}"},
                    json={"prompt": "a lighthouse", "size": "512x512", "quality": "low"},
                )
            call.start()
            _wait_for_a_job(settings.database_url, tenant.account_id)
            proxy.stop()
            response = call.answer()
            assert response.status_code == 503, response.text
            request_id = _request_id(response)
            [job] = _jobs_of(settings.database_url, tenant.account_id)
            assert request_id.endswith(job.id)
            if dialect == "sync":
                message = response.json()["message"]
                assert response.json()["request_id"] == request_id
                assert response.json()["polling_url"].endswith(f"/v2/requests/status/{request_id}")
            else:
                error = response.json()["error"]
                assert error["type"] == "server_error"
                message = error["message"]
            assert request_id in message and "Do not resend" in message
            assert "retry shortly" not in message

            proxy.start()
            runtime.engine = tiny_engine
            runtime.start_worker()
            with httpx.Client(base_url=live.url, timeout=30) as client:
                deadline = time.monotonic() + 60
                while True:
                    status = client.get(f"/v2/requests/status/{request_id}", headers=tenant.headers)
                    if status.status_code == 200 and status.json()["status"] == "COMPLETED":
                        break
                    assert time.monotonic() < deadline, status.text
                    time.sleep(0.2)
        finally:
            live.stop()
            runtime.close()
    _charged_once(settings.database_url, tenant.account_id)


_SLOW_COMMIT = """
CREATE OR REPLACE FUNCTION auraserve_test_slow_commit() RETURNS trigger AS $$
BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$ LANGUAGE plpgsql;
CREATE CONSTRAINT TRIGGER auraserve_test_slow_commit AFTER INSERT ON jobs
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION auraserve_test_slow_commit();
"""
_FAST_COMMIT = """
DROP TRIGGER IF EXISTS auraserve_test_slow_commit ON jobs;
DROP FUNCTION IF EXISTS auraserve_test_slow_commit();
"""


@pytest.mark.parametrize("dialect", ["queue", "sync"])
def test_a_submit_cut_off_at_its_commit_is_not_told_nothing_was_written(
    settings: Settings, tiny_engine: Any, dialect: str
) -> None:
    """The connection is cut while the server runs the submit's COMMIT (a deferred trigger
    holds it there), and the server commits anyway. The API cannot know from the error; it
    asks the store once it answers, finds the job, and answers as accepted (the queue's 202,
    the sync image), never "retry" (which made a second job, charged again)."""
    admin = create_engine(
        make_url(settings.database_url).set(drivername="postgresql+psycopg"),
        isolation_level="AUTOCOMMIT",
    )
    target = make_url(settings.database_url)
    try:
        with admin.connect() as conn:
            conn.execute(text(_SLOW_COMMIT))
        with TcpProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
            runtime, live = _proxied_server(settings, proxy)
            try:
                tenant = make_tenant(runtime, credits=10**6)
                if dialect == "queue":
                    call = _Call(live.url, QUEUE_SUBMIT, headers=tenant.headers, json=JOB_BODY)
                else:
                    runtime.engine = tiny_engine
                    runtime.start_worker()
                    call = _Call(
                        live.url, "/v1/aura-flow", headers={"x-api-key": tenant.key}, data=SYNC_FORM
                    )
                call.start()
                deadline = time.monotonic() + 30
                with admin.connect() as conn:  # until the COMMIT sleeps in the trigger
                    while not conn.execute(
                        text("SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'")
                    ).first():
                        assert time.monotonic() < deadline
                        time.sleep(0.02)
                proxy.stop()  # the API's connection is cut; the server goes on and commits
                proxy.start()
                with admin.connect() as conn:
                    conn.execute(text(_FAST_COMMIT))
                response = call.answer()
                assert response.status_code == (202 if dialect == "queue" else 200), response.text
                [job] = _jobs_of(settings.database_url, tenant.account_id)
                assert _request_id(response).endswith(job.id)
            finally:
                live.stop()
                runtime.close()
    finally:
        with admin.connect() as conn:
            conn.execute(text(_FAST_COMMIT))
        admin.dispose()
    _assert_money_consistent(settings.database_url)


# --- streams and workers during an outage (issue 18, point 3) ---------------------------------


def test_a_status_stream_ends_with_an_error_event_when_the_database_goes(
    settings: Settings, records: Records
) -> None:
    """Not an incomplete chunked body ("ASGI callable returned without completing response"):
    a last `error` event, then the end of the stream."""
    target = make_url(settings.database_url)
    with TcpProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
        runtime, live = _proxied_server(settings, proxy)
        try:
            tenant = make_tenant(runtime, credits=10**6)
            with httpx.Client(base_url=live.url, timeout=30) as client:
                submitted = client.post(QUEUE_SUBMIT, headers=tenant.headers, json=JOB_BODY)
                request_id = submitted.json()["request_id"]
                url = f"/v2/requests/status/{request_id}/stream"
                with client.stream("GET", url, headers=tenant.headers) as stream:
                    lines = stream.iter_lines()
                    assert next(lines).startswith("data: ")  # the QUEUED status
                    proxy.stop()
                    rest = list(lines)  # ends cleanly: httpx raises on a cut chunked body
            events = [line for line in rest if line.startswith(("event:", "data:"))]
            assert events[-2] == "event: error", rest
            error = json.loads(events[-1].removeprefix("data: "))
            assert error["error"] == "Service Unavailable"
            assert error["retry_after"] >= 1 and "reconnect" in error["message"]
        finally:
            live.stop()
            runtime.close()
    assert not [r for r in records.records if "ASGI callable" in r.getMessage()]


def test_a_worker_logs_an_outage_in_a_batch_once_as_a_store_error(
    settings: Settings, tiny_engine: Any, records: Records
) -> None:
    """The database goes away while a batch runs: one "database unavailable" line from the
    worker, no "engine failure", no traceback; the job still completes once it is back."""
    target = make_url(settings.database_url)
    with TcpProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
        runtime, live = _proxied_server(settings, proxy)
        try:
            tenant = make_tenant(runtime, credits=10**6)
            runtime.engine = tiny_engine
            runtime.start_worker()
            with httpx.Client(base_url=live.url, timeout=30) as client:
                body = {**JOB_BODY, "num_inference_steps": 40, "width": 768, "height": 768}
                submitted = client.post(QUEUE_SUBMIT, headers=tenant.headers, json=body)
                assert submitted.status_code == 202, submitted.text
            deadline = time.monotonic() + 60
            while not [
                r for r in _jobs_of(settings.database_url, tenant.account_id) if r.progress_step > 0
            ]:
                assert time.monotonic() < deadline, "the batch never reported progress"
                time.sleep(0.02)
            proxy.stop()
            time.sleep(2.0)  # steps go on; their progress writes fail
            proxy.start()
            deadline = time.monotonic() + 90
            while True:
                [job] = _jobs_of(settings.database_url, tenant.account_id)
                if job.status not in ("QUEUED", "PROCESSING"):
                    break
                assert time.monotonic() < deadline, job.status
                time.sleep(0.1)
        finally:
            live.stop()
            runtime.close()
    worker_lines = [r for r in records.records if r.name == "auraserve.worker.loop"]
    messages = [r.getMessage() for r in worker_lines]
    assert not [m for m in messages if "engine failure" in m], messages
    assert len([m for m in messages if "database unavailable" in m]) == 1, messages
    assert not [r for r in worker_lines if r.exc_info], messages
    assert job.status == "COMPLETED", job.error
