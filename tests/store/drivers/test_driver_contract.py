"""The driver interface (`store.drivers.base.Driver`), checked on both backends alike: a real
SQLite file and a real PostgreSQL database, whatever AURASERVE_TEST_BACKEND says (PostgreSQL
is skipped only when that run is SQLite's and no server answers)."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import DBAPIError

from auraserve.errors import InsufficientBalance, StoreUnavailable
from auraserve.store import jobs, keys
from auraserve.store.db import Store
from auraserve.store.drivers import check_url, normalise_url, open_driver
from auraserve.store.drivers.postgresql import PostgresDriver
from auraserve.store.drivers.sqlite import SqliteDriver
from auraserve.store.events import WORK
from auraserve.store.schema import metadata, webhook_deliveries
from tests.conftest import BACKEND, PG_ADMIN_URL
from tests.store_jobs import MODEL, submit_job

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str | None]:
    """A throwaway PostgreSQL database for this module, or None when none can be made."""
    admin = create_engine(normalise_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    name = f"auraserve_contract_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except DBAPIError:
        if BACKEND == "postgresql":
            raise
        admin.dispose()
        yield None
        return
    yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    with admin.connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str | None) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'contract.db'}"
    if pg_url is None:
        pytest.skip("no PostgreSQL server answers (AURASERVE_TEST_PG_URL)")
    return pg_url


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    opened = Store(url)
    opened.migrate()
    with opened.write() as conn:  # the PostgreSQL database is shared by this module's tests
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    yield opened
    opened.dispose()


def test_the_url_chooses_the_driver_once(url: str) -> None:
    driver = open_driver(url)
    expected = SqliteDriver if url.startswith("sqlite") else PostgresDriver
    assert type(driver) is expected and driver.name == expected.name
    assert driver.url == normalise_url(url)
    assert "password" not in open_driver(normalise_url(url)).label()


def test_urls_as_people_write_them() -> None:
    assert normalise_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalise_url("postgresql://h/db") == "postgresql+psycopg://h/db"
    assert normalise_url("postgresql+psycopg2://h/db") == "postgresql+psycopg2://h/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ValueError, match="must start with"):
        check_url("mysql://h/db")
    label = open_driver("postgres://user:secret@db.example/app").label()
    assert "secret" not in label and "db.example" in label


def test_capabilities_say_what_differs(store: Store, url: str) -> None:
    driver = store.driver
    local = url.startswith("sqlite")
    assert (driver.local_file is not None) is local
    assert driver.inline_calls is local  # a local file answers in microseconds
    assert driver.hears_every_commit is not local  # LISTEN hears every commit
    assert driver.exists()


def test_a_store_that_is_not_there_does_not_exist(url: str, tmp_path: Path) -> None:
    if url.startswith("sqlite"):
        assert not open_driver(f"sqlite:///{tmp_path / 'none.db'}").exists()
        return
    admin = create_engine(normalise_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    name = f"auraserve_empty_{os.getpid()}_{secrets.token_hex(3)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        assert not open_driver(f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}").exists()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def test_a_write_commits_whole_or_not_at_all(store: Store) -> None:
    keys.create_account(store, "a", credits=5)
    accounts = metadata.tables["accounts"]

    def roll_back() -> None:
        with store.write() as conn:
            conn.execute(accounts.update().values(balance=99))
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        roll_back()
    with store.read() as conn:
        assert conn.execute(select(accounts.c.balance)).scalar_one() == 5
    with store.write() as conn:
        conn.execute(accounts.update().values(balance=7))
    with store.read() as conn:
        assert conn.execute(select(accounts.c.balance)).scalar_one() == 7


def test_writers_take_turns(store: Store) -> None:
    """Read-modify-write transactions of many threads lose no update: SQLite's writers queue
    on its locks; on PostgreSQL the row lock of `FOR UPDATE` does the same."""
    account = keys.create_account(store, "a").account_id
    accounts = metadata.tables["accounts"]

    def bump() -> None:
        for _ in range(10):
            with store.write() as conn:
                balance = conn.execute(
                    select(accounts.c.balance).where(accounts.c.id == account).with_for_update()
                ).scalar_one()
                conn.execute(accounts.update().values(balance=balance + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with store.read() as conn:
        assert conn.execute(select(accounts.c.balance)).scalar_one() == 40


def test_migrations_may_run_in_many_processes_at_once(url: str, store: Store) -> None:
    others = [Store(url) for _ in range(3)]
    try:
        threads = [threading.Thread(target=other.migrate) for other in others]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(other.schema_is_current() for other in others)
    finally:
        for other in others:
            other.dispose()


def test_another_process_hears_committed_events(url: str, store: Store) -> None:
    """`notify` and `join`: a commit in one store wakes the other's bus (PostgreSQL's
    NOTIFY, SQLite's datagrams between the processes sharing its file)."""
    other = Store(url)
    try:
        store.start_listener()  # every serving process joins (API lifespan, workers)
        other.start_listener()
        deadline = time.monotonic() + 5
        while store.driver.hears_every_commit and not other.bus.listening:
            assert time.monotonic() < deadline, "never listening"
            time.sleep(0.01)
        seen = other.bus.work_seq()
        heard: list[str | None] = []
        other.bus.on_job_event(heard.append)
        account = keys.create_account(store, "a", credits=10**6).account_id
        job_id = submit_job(store, account)
        other.bus.wait_for_work(seen, timeout=5)
        deadline = time.monotonic() + 5
        while job_id not in heard:
            assert time.monotonic() < deadline, f"never heard of {job_id}: {heard}"
            time.sleep(0.01)
    finally:
        other.dispose()


def test_the_status_read_equals_the_stores_own_read(store: Store) -> None:
    account = keys.create_account(store, "a", credits=10**6).account_id
    first, second = submit_job(store, account), submit_job(store, account)
    jobs.claim(store, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30)

    async def read() -> None:
        reader = store.job_reads
        for job_id in (first, second):
            fast = await reader.get(job_id, account_id=account)
            assert fast == jobs.get(store, job_id, account_id=account)
        assert (await reader.get(second, account_id=account)).queue_position == 0  # type: ignore[union-attr]
        assert await reader.get(first, account_id="acct_other") is None
        await store.aclose()

    asyncio.run(read())


def test_a_batch_of_submits_is_all_or_nothing(store: Store) -> None:
    """`jobs.submit`, through `submit_at_once` where the driver has it: each job counted once
    by the transition point (WORK events, metrics), all of them or none."""
    from auraserve.core.presets import default_presets
    from auraserve.core.request import build_request

    preset = default_presets()[MODEL]
    request = build_request({"prompt": "p"}, model=MODEL, preset=preset)
    price = request.price(preset)
    account = keys.create_account(store, "a", credits=3 * price).account_id
    published: list[tuple[str, str]] = []
    store.bus.forward = lambda kind, job_id: published.append((kind, job_id))
    with pytest.raises(InsufficientBalance):
        jobs.submit(
            store,
            account_id=account,
            new_jobs=[jobs.NewJob(request, price) for _ in range(4)],
            max_queued=10,
            max_attempts=1,
        )
    assert jobs.count_active(store, account) == 0 and published == []
    made, balance = jobs.submit(
        store,
        account_id=account,
        new_jobs=[jobs.NewJob(request, price) for _ in range(3)],
        max_queued=10,
        max_attempts=1,
    )
    assert balance == 0 and jobs.count_active(store, account) == 3
    assert published == [(WORK, job.id) for job in made]


def test_insert_ignoring_inserts_once(store: Store) -> None:
    account = keys.create_account(store, "a", credits=10**6).account_id
    job_id = submit_job(store, account)
    now = time.time()
    values = {
        "event_id": "evt_1",
        "job_id": job_id,
        "account_id": account,
        "url": "https://hooks.example.com/x",
        "payload": "{}",
        "terminal": True,
        "state": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
        "updated_at": now,
    }
    with store.write() as conn:
        assert store.driver.insert_ignoring(conn, webhook_deliveries, values, ["event_id"])
        assert not store.driver.insert_ignoring(conn, webhook_deliveries, values, ["event_id"])


def test_a_wrong_statement_is_an_error_not_an_outage(store: Store) -> None:
    with pytest.raises(DBAPIError) as caught, store.read() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert not store.is_unavailable(caught.value)


def test_an_outage_is_unavailable(url: str, store: Store) -> None:
    """What each backend raises when it cannot be used right now is a 503, not a 500: a
    PostgreSQL server that refuses connections, a SQLite file another process has locked."""
    if url.startswith("sqlite"):
        import sqlite3

        path = str(store.driver.local_file)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(sqlite3.OperationalError) as caught:
                sqlite3.connect(path, timeout=0, isolation_level=None).execute("BEGIN IMMEDIATE")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        wrapped = DBAPIError.instance("SELECT 1", None, caught.value, sqlite3.Error)
        assert store.is_unavailable(wrapped)
        return
    dead = Store("postgresql+psycopg://127.0.0.1:1/none")
    try:
        with pytest.raises(StoreUnavailable) as unavailable, dead.read() as conn:
            conn.execute(text("SELECT 1"))
        assert dead.is_unavailable(unavailable.value.__cause__)  # type: ignore[arg-type]
    finally:
        dead.dispose()


def test_store_calls_run_inline_only_where_the_driver_says(store: Store) -> None:
    async def where() -> bool:
        return await store.call(lambda: threading.get_ident()) == threading.get_ident()

    assert asyncio.run(where()) is store.driver.inline_calls
