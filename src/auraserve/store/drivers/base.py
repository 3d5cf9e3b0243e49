"""The driver interface: everything that differs between SQLite and PostgreSQL, in the manner
of River's `riverdriver.Driver`. The rest of the store (and everything above it) is written
once against it; `drivers.open_driver` picks the implementation from the URL, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import namedtuple
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

from sqlalchemy import Connection, Select, Table
from sqlalchemy.engine import Dialect, Engine

from auraserve.core.jobs import Job

if TYPE_CHECKING:
    from auraserve.store.events import LocalBus
    from auraserve.store.reads import QueuePositions


class Closeable(Protocol):
    def close(self) -> None: ...


class JobReader(ABC):
    """Reads one job of one account for a status poll, without SQLAlchemy's per-call
    machinery: clients poll far more often than anything else happens. Its answer equals
    `store.jobs.get(store, job_id, account_id=...)`: the same tenant-scoped statement
    (`reads.SELECT_TENANT_JOB`), the same queue positions (`QueuePositions`)."""

    def __init__(self, positions: QueuePositions) -> None:
        self.positions = positions

    @abstractmethod
    async def get(self, job_id: str, *, account_id: str) -> Job | None:
        """The job, if it exists and belongs to `account_id` (else None), with its queue
        position when QUEUED. Raises `StoreUnavailable` when the database cannot be reached."""

    async def aclose(self) -> None:
        """Close what lives on the event loop (the API's lifespan calls this at shutdown)."""
        self.close()

    @abstractmethod
    def close(self) -> None:
        """Close the connections (idempotent); a later read opens new ones."""


class Compiled:
    """A statement's text in one raw driver's parameter style, with the constants SQLAlchemy
    turned into parameters (the status literal, the LIMIT) filled in, and its rows given
    attribute access by column name (what `Job.from_row` reads)."""

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._constants = {k: v for k, v in compiled.params.items() if v is not None}
        self._make_row: Callable[[Sequence[Any]], Any] | None = None

    def params(self, **values: object) -> dict[str, object]:
        return {**self._constants, **values}

    def row(self, description: Any, values: Sequence[Any]) -> Any:
        """`values` as a row, in a row class made once from the first result's column names
        (only then is the description read: psycopg builds it anew at each read)."""
        make = self._make_row
        if make is None:
            names = [column[0] for column in description]
            make = self._make_row = cast(Any, namedtuple("Row", names))._make
        return make(values)


class Driver(ABC):
    """One backend. Made by `drivers.open_driver(url)`; owned by one `Store`."""

    name: ClassVar[str]
    # Store calls take microseconds and may run on the event loop (else: a thread).
    inline_calls: ClassVar[bool]
    # Every commit of every process reaches this process's bus while it listens (LISTEN):
    # only then may a process cache job rows (`JobRowCache`).
    hears_every_commit: ClassVar[bool]

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def local_file(self) -> Path | None:
        """The database file, for a store that is one on this machine; else None."""
        return None

    @abstractmethod
    def label(self) -> str:
        """Where the store is, for people (no password)."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether a store is there (without creating one)."""

    @abstractmethod
    def create_engine(self, *, pool_size: int, options: dict[str, Any]) -> Engine:
        """The engine, its connections set up for this backend."""

    @abstractmethod
    def transaction(self, engine: Engine, *, write: bool) -> AbstractContextManager[Connection]:
        """A transaction that commits when the block ends; `write`: writers take turns as
        this backend needs (SQLite: BEGIN IMMEDIATE under the writer locks)."""

    @abstractmethod
    def lock_migrations(self, conn: Connection) -> None:
        """Hold other processes' migrations off until this transaction ends."""

    @abstractmethod
    def notify(self, conn: Connection, events: Sequence[tuple[str, str]]) -> None:
        """Have the database carry a transaction's events to other processes at its commit
        (PostgreSQL's NOTIFY); called by `Store.send_events`, before the COMMIT."""

    @abstractmethod
    def join(self, bus: LocalBus) -> Closeable | None:
        """Start hearing other processes' events on `bus` (and, where events travel outside
        the database, sending ours); None where this store cannot."""

    @abstractmethod
    def job_reader(self, positions: QueuePositions, bus: LocalBus) -> JobReader:
        """The status poll's read path."""

    # A batch of new jobs (without webhooks) can go as one statement that is its own
    # transaction (`submit_at_once`).
    submits_at_once: ClassVar[bool] = False

    def submit_at_once(
        self,
        conn: Connection,
        rows: Sequence[dict[str, Any]],
        *,
        max_active: int,
        events: Sequence[tuple[str, str]],
    ) -> int | None:
        """Where `submits_at_once`: insert the new jobs `rows` (one account's), reserve their
        credits and queue slots and notify `events`, all or nothing, in one statement on an
        autocommit connection. Returns the balance left, or None when they did not fit."""
        raise NotImplementedError

    # The dialect's INSERT construct, which has ON CONFLICT DO NOTHING (`insert_ignoring`).
    insert: ClassVar[staticmethod[[Table], Any]]

    def insert_ignoring(
        self, conn: Connection, table: Table, values: dict[str, Any], key: Sequence[str]
    ) -> bool:
        """Insert a row unless one with the same `key` columns exists; True if inserted."""
        statement = (
            self.insert(table)
            .values(**values)
            .on_conflict_do_nothing(index_elements=list(key))
            .returning(*(table.c[name] for name in key))
        )
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT that SQLAlchemy gave an
        # implicit RETURNING of its own.
        return conn.execute(statement).first() is not None

    @abstractmethod
    def is_unavailable(self, exc: BaseException) -> bool:
        """True when `exc` (a SQLAlchemy error) says this backend cannot be used right now
        rather than that a statement is wrong: a 503 to retry, never a 500. (`Store` checks
        the backend-neutral cases first: a pool timeout, an invalidated connection.)"""

    @abstractmethod
    def close(self) -> None:
        """Release what the driver holds itself (lock files)."""


def payloads(events: Sequence[tuple[str, str]]) -> list[str]:
    """Events as they travel between processes: `kind:job_id`."""
    return [f"{kind}:{job_id}" for kind, job_id in events]
