"""The store: one `Store` object per store, its driver, its caches, its transactions.

Everything that belongs to one store rather than to the process (hooks, the event bus, the
short-lived caches, the status reader, the server key) lives on its `Store`, so two of them
(tests, a CLI next to a server) never see each other's. It is passed explicitly; store
functions that get only a connection (`jobs.submit_in`) find theirs with `store_of`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from anyio import to_thread
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from auraserve.core.credentials import ServerKey
from auraserve.core.jobs import Job
from auraserve.errors import StoreUnavailable
from auraserve.observability import metrics
from auraserve.store.cache import Flights, TtlCache
from auraserve.store.drivers import open_driver
from auraserve.store.drivers.base import Closeable, JobReader
from auraserve.store.events import LocalBus, take_events, unsent_events
from auraserve.store.migrations import HEAD_REVISION
from auraserve.store.reads import POSITION_TTL, QueuePositions

if TYPE_CHECKING:
    from auraserve.store.keys import Account

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_STORE_OPTION = "auraserve_store"

TransitionHook = Callable[[Connection, Job], None]
"""Runs inside the transaction that moves a job to a new status, so whatever it writes (the
webhook outbox's delivery rows) commits or rolls back with that status."""

CommittedHook = Callable[[Job], None]
"""Runs after the transaction that changed a job's status committed (metrics): a rolled-back
change is never seen, and a failing hook cannot undo the change."""
_COMMITTED_KEY = "auraserve_committed_jobs"

# Every request authenticates; a verified key is remembered for a moment so hot polling does
# not repeat the lookup. Revoking through a Store clears its cache at once; a revocation made
# elsewhere (the CLI, another replica) takes effect within AUTH_CACHE_TTL + AUTH_CACHE_GRACE
# = 2 seconds (the documented promise), counted from the lookup's start.
AUTH_CACHE_TTL = 1.0
# After the TTL, reads (GET) may still answer with a key's account while one lookup renews it
# (api.auth), so no poll waits on the store each time it expires; never longer than this, and
# never for a request that writes (a submit waits for a lookup instead: api.auth).
AUTH_CACHE_GRACE = 1.0
AUTH_CACHE_MAX = 10_000

# Status polls ask "does a live worker serve this model?" (store.workers.live_models); one
# lookup per process per second keeps that off the hot path however many clients poll.
LIVE_MODELS_TTL = 1.0
LIVE_MODELS_GRACE = 30.0


class Store:
    """Owns the engine and the driver; hands out short transactions. Thread-safe."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        auth_cache_ttl: float = AUTH_CACHE_TTL,
        position_ttl: float = POSITION_TTL,
        server_key: ServerKey | None = None,
    ) -> None:
        self.driver = open_driver(url)
        self.url = self.driver.url
        self.bus = LocalBus()
        # A store opened without the configured key (tests, one-off tools) gets a random one
        # for its lifetime: its webhook secrets are unguessable, only not stable.
        self.server_key = server_key if server_key is not None else ServerKey.random()
        self.auth_cache: TtlCache[str, Account] = TtlCache(
            ttl=auth_cache_ttl, maxsize=AUTH_CACHE_MAX, grace=AUTH_CACHE_GRACE
        )
        self.positions = QueuePositions(ttl=position_ttl)
        # Keyed by the staleness bound asked with.
        self.live_models: TtlCache[float, frozenset[str]] = TtlCache(
            ttl=LIVE_MODELS_TTL, maxsize=8, grace=LIVE_MODELS_GRACE
        )
        self._job_reads: JobReader | None = None
        self._transition_hooks: list[TransitionHook] = []
        self._committed_hooks: list[CommittedHook] = []
        self._events: Closeable | None = None
        # Per event loop: the store calls in flight, by what they renew (`renewal`).
        self._renewing: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, Flights[Hashable, Any]
        ] = weakref.WeakKeyDictionary()
        self.engine = self.driver.create_engine(pool_size=pool_size, options={_STORE_OPTION: self})
        self.on_committed_transition(metrics.observe_transition)

    def on_transition(self, hook: TransitionHook) -> None:
        """Run `hook` in every status change made through this store (once per hook)."""
        if hook not in self._transition_hooks:
            self._transition_hooks.append(hook)

    def on_committed_transition(self, hook: CommittedHook) -> None:
        """Run `hook(job)` after each committed status change (once per hook). A hook's
        exception is swallowed: the change is already committed."""
        if hook not in self._committed_hooks:
            self._committed_hooks.append(hook)
        self.on_transition(_remember_transition)

    @property
    def transition_hooks(self) -> tuple[TransitionHook, ...]:
        return tuple(self._transition_hooks)

    @property
    def job_reads(self) -> JobReader:
        """The status poll's read (the driver's), sharing this store's queue positions."""
        if self._job_reads is None:
            self._job_reads = self.driver.job_reader(self.positions, self.bus)
        return self._job_reads

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that will write; writers take turns as the driver needs.

        A database that cannot be reached raises `StoreUnavailable` (see `is_unavailable`):
        before the COMMIT, nothing of the transaction happened; during it (`in_doubt`), the
        server may have committed it, and only a later read can tell."""
        stage = _Stage()
        transaction = self.driver.transaction(self.engine, write=True)
        with self._unavailable_as_error(stage), transaction as conn:
            _take_committed(conn)  # drop leftovers of a rolled-back transaction
            take_events(conn)
            yield conn
            self.send_events(conn)
            events, changed = take_events(conn), _take_committed(conn)
            stage.committing = True  # leaving the block sends the COMMIT
        self.committed(events, changed)

    @contextmanager
    def at_once(self) -> Iterator[Connection]:
        """A connection in autocommit, for one statement that is a whole transaction (the
        driver's `submit_at_once`): a lock it takes is not held across a round trip to this
        process. Events and transitions recorded meanwhile are delivered after it, as
        `write`'s are. `StoreUnavailable` is `in_doubt` once the connection was handed out."""
        stage = _Stage()
        with self._unavailable_as_error(stage), self.engine.connect() as conn:
            stage.committing = True
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            _take_committed(conn)
            take_events(conn)
            yield conn
            events, changed = take_events(conn), _take_committed(conn)
        self.committed(events, changed)

    def send_events(self, conn: Connection) -> None:
        """Hand the transaction's events recorded so far to the driver's `notify` (delivered
        to other processes at the COMMIT). `write` does so at the end; a transaction that
        must end on a given statement (a submit's account-row lock) does it before that."""
        self.driver.notify(conn, unsent_events(conn))

    def committed(self, events: list[tuple[str, str]], changed: list[Job]) -> None:
        """After a commit: wake whoever waits on these jobs (now it is safe: they can see the
        rows), then run the committed-transition hooks."""
        with self.bus.batch():
            for kind, job_id in events:
                self.bus.publish(kind, job_id)
        for job in changed:
            for hook in self._committed_hooks:
                try:
                    hook(job)
                except Exception:
                    log.exception("a committed-transition hook failed")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (on SQLite it never blocks writers). An unreachable
        database raises `StoreUnavailable`."""
        with self._unavailable_as_error(), self.driver.transaction(self.engine, write=False) as c:
            yield c

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call the (synchronous) store from async code: inline where the driver's calls take
        microseconds (a thread hand-off makes the loop and the pool threads contend for the
        GIL, queueing each behind the 5 ms switch interval: inline calls raised poll
        throughput several-fold, docs/benchmarks.md), else in a thread (they wait on the
        network). An inline write that waits for another process's lock (the CLI) blocks the
        loop for that moment; such writes are single short transactions."""
        if self.driver.inline_calls:
            return fn(*args, **kwargs)
        return await to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    def renewal(self, key: Hashable, fetch: Callable[[], T]) -> asyncio.Future[T]:
        """The store call in flight for `key` on this event loop, or a new one running
        `fetch`: however many requests ask meanwhile, one call (`Flights`)."""
        flights = self._renewing.setdefault(asyncio.get_running_loop(), Flights())
        running: asyncio.Future[T] = flights.start(key, lambda: self.call(fetch))
        return running

    async def refreshed(
        self,
        key: Hashable,
        *,
        fresh: Callable[[], T | None],
        stale: Callable[[], T | None],
        fetch: Callable[[], T],
    ) -> T:
        """A value the store's caches hold: `fresh()` when it has one; else `fetch()` renews it
        (once per `key` at a time) and `stale()` answers now if it can, or the caller waits.
        Why: requests that each went to the store when an entry expired (tens of polls, 50-250
        ms each) were the p99 of bench/scaleout.py's polls."""
        value = fresh()
        if value is not None:
            return value
        pending = self.renewal(key, fetch)
        value = stale()
        if value is not None:
            return value
        return await asyncio.shield(pending)

    def migrate(self, on_step: Callable[[int, int], None] | None = None) -> None:
        """Bring the schema to the newest revision; safe to call from many processes at once.
        `on_step(done, total)` hears of each revision applied (the CLI's progress bar)."""
        if self.schema_is_current():
            return
        # Alembic costs about half a second to import; an admin command on a current store
        # (the common case) never needs it.
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.write() as conn:
            self.driver.lock_migrations(conn)
            cfg.attributes["connection"] = conn
            if on_step is not None:
                current = MigrationContext.configure(conn).get_current_revision()
                script = ScriptDirectory.from_config(cfg)
                total = len(list(script.iterate_revisions("heads", current)))
                done = [0]
                on_step(0, total)

                def applied(**_: Any) -> None:
                    done[0] += 1
                    on_step(done[0], total)

                cfg.attributes["on_version_apply"] = applied
            command.upgrade(cfg, "head")

    def schema_is_current(self) -> bool:
        """True when the store exists and its schema is at `HEAD_REVISION`; an unreachable
        store raises `StoreUnavailable` rather than passing for a new one."""
        try:
            with self.read() as conn:
                version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError:
            return False  # no alembic_version table yet: a new store
        return version == HEAD_REVISION

    def start_listener(self) -> None:
        """Hear other processes' events (the driver's LISTEN, or SQLite's fan-out)."""
        if self._events is None:
            self._events = self.driver.join(self.bus)

    def is_unavailable(self, exc: BaseException) -> bool:
        """True when `exc` says the database cannot be used right now (down, restarting, the
        connection cut, the pool exhausted, or what the driver says means that) rather than
        that a statement is wrong: such a failure is a 503 to retry, never a 500."""
        if isinstance(exc, StoreUnavailable | PoolTimeout):
            return True
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        return self.driver.is_unavailable(exc)

    async def aclose(self) -> None:
        """Close what lives on the event loop (the status reader's pool)."""
        if self._job_reads is not None:
            await self._job_reads.aclose()

    def dispose(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._job_reads is not None:
            self._job_reads.close()
        self.engine.dispose()
        self.driver.close()

    @contextmanager
    def _unavailable_as_error(self, stage: _Stage | None = None) -> Iterator[None]:
        try:
            yield
        except (DBAPIError, PoolTimeout) as exc:
            if not self.is_unavailable(exc):
                raise
            raise StoreUnavailable(in_doubt=stage is not None and stage.committing) from exc


class _Stage:
    """How far a write got: set once its COMMIT (or its one autocommit statement) is sent."""

    committing = False


def _remember_transition(conn: Connection, job: Job) -> None:
    conn.info.setdefault(_COMMITTED_KEY, []).append(job)


def _take_committed(conn: Connection) -> list[Job]:
    changed: list[Job] = conn.info.pop(_COMMITTED_KEY, [])
    return changed


def store_of(conn: Connection) -> Store:
    """The `Store` whose engine opened `conn`."""
    store = conn.get_execution_options().get(_STORE_OPTION)
    if not isinstance(store, Store):
        raise RuntimeError("this connection was not opened by an auraserve Store")
    return store
