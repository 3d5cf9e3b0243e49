"""The running parts of one auraserve process, opened and closed together.

`serve` builds one with an engine (API + in-process worker), `worker` one without the API, the
CLI's admin commands one with neither. Tests build them with the tiny model.

Serving processes (API, worker) also run the maintenance tasks (`start_maintenance`): periodic
jobs that keep the shared store healthy whoever else is up, first of all requeueing expired
leases, so that with every worker dead a job still leaves PROCESSING within lease_seconds +
sweep_interval_seconds. Admin commands never start them.

Stopping (`begin_stop`, then `close`): workers stop claiming at once, the batch in hand gets
stop_grace_seconds from the first signal, then whatever is unfinished goes back to the queue;
`hurry` (a second signal) hands it back at once.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from auraserve.config import Settings
from auraserve.core.credentials import load_server_key
from auraserve.engine.base import Engine
from auraserve.errors import ConfigError
from auraserve.media.factory import open_media_store
from auraserve.media.lifecycle import MediaMaintenance
from auraserve.media.storage import MediaStore
from auraserve.store import jobs, keys
from auraserve.store import workers as registry
from auraserve.store.db import Store
from auraserve.webhooks import outbox

if TYPE_CHECKING:
    from auraserve.api.ratelimit import RateLimiter
    from auraserve.webhooks.outbox import Dispatcher
    from auraserve.worker.loop import Worker

log = logging.getLogger(__name__)

# Registry rows of workers not heard from for this long are deleted (checked hourly).
WORKER_ROW_TTL_SECONDS = 7 * 24 * 3600.0


@dataclass
class PeriodicTask:
    """`run` every `interval` seconds, first at start. It must be safe to run in several
    processes at once (every replica runs every task): store-side fencing, not coordination."""

    name: str
    interval: float
    run: Callable[[], object]


class Maintenance:
    """One daemon thread per task, so a slow task (a media sweep listing a bucket) never
    delays another (lease recovery). A failing task is logged once per failing streak at error
    level (a database outage must not print a traceback every few seconds) and retried at its
    interval; its recovery is logged too."""

    def __init__(self, tasks: list[PeriodicTask] | None = None) -> None:
        self.tasks: list[PeriodicTask] = list(tasks or [])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def add(self, task: PeriodicTask) -> None:
        self.tasks.append(task)
        if self._threads:  # already running: start this one too
            self._start(task)

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        if self._threads or self._stop.is_set():
            return
        for task in self.tasks:
            self._start(task)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _start(self, task: PeriodicTask) -> None:
        thread = threading.Thread(
            target=self._loop, args=(task,), name=f"maintenance: {task.name}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _loop(self, task: PeriodicTask) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                task.run()
            except Exception as exc:
                if not failing:
                    log.error(
                        "maintenance task %r failed: %r; retrying every %g s",
                        task.name,
                        exc,
                        task.interval,
                    )
                failing = True
            else:
                if failing:
                    log.info("maintenance task %r works again", task.name)
                failing = False
            self._stop.wait(task.interval)


def _requeue_expired(db: Store) -> None:
    requeued, errored = jobs.recover_expired(db)
    if requeued or errored:
        log.warning(
            "rescued jobs whose worker stopped heartbeating: %d requeued %s, %d ended in ERROR "
            "after their last attempt %s",
            len(requeued),
            requeued[:10],
            len(errored),
            errored[:10],
        )


def open_store(
    settings: Settings, on_migration_step: Callable[[int, int], None] | None = None
) -> Store:
    """The configured store, migrated, with the configured server key: all that admin
    commands open (`cli.stores.open_admin`), and the first part of a `Runtime`."""
    # 0700: the data dir holds the server key, the database and every image.
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        server_key = load_server_key(
            settings.secret_key.get_secret_value() if settings.secret_key else None,
            settings.secret_key_file,
            settings.data_dir,
        )
    except ValueError as exc:
        # A key file that is missing or too short: a setting to fix, not a crash.
        named = "AURASERVE_SECRET_KEY_FILE" if settings.secret_key_file else "the server key"
        raise ConfigError(f"{named}: {exc}") from None
    db = Store(settings.resolved_database_url, server_key=server_key)
    try:
        db.migrate(on_migration_step)
    except BaseException:
        db.dispose()
        raise
    return db


@dataclass
class Runtime:
    settings: Settings
    db: Store
    media: MediaStore
    engine: Engine | None = None
    workers: list[Worker] = field(default_factory=list)
    # Set by the API's lifespan (they live on its event loop): the webhook dispatcher and the
    # per-account rate limiter. Worker-only processes have neither.
    outbox: Dispatcher | None = None
    limiter: RateLimiter | None = None
    # An API child of `serve --api-processes N` whose supervisor runs this node's workers:
    # /readyz then asks the worker registry instead of `workers`.
    workers_in_supervisor: bool = False
    # Periodic store upkeep (lease rescue, ...); started only by serving processes.
    maintenance: Maintenance = field(default_factory=Maintenance)
    # Set by `begin_stop` (a first SIGTERM): workers stop claiming, SSE streams end.
    stopping: threading.Event = field(default_factory=threading.Event)
    # Set by a second signal: hand the batch in hand back now instead of waiting out the grace.
    hurry: threading.Event = field(default_factory=threading.Event)
    # This process created the store (a first start): the CLI says so in its start-up line.
    store_created: bool = False
    _stop_deadline: float | None = field(default=None, init=False, repr=False)
    _stop_watcher: threading.Thread | None = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    @classmethod
    def open(
        cls,
        settings: Settings,
        *,
        engine: Engine | None = None,
        on_migration_step: Callable[[int, int], None] | None = None,
    ) -> Runtime:
        db = open_store(settings, on_migration_step)
        # Every process that changes job statuses records their webhook deliveries in the
        # same transactions (API: cancels; workers: results), whoever sends them later.
        # Disk under data_dir/media, or S3 for processes on many machines (media.factory).
        media = open_media_store(settings)
        outbox.install(db, settings.webhooks, media_url=media.url)
        maintenance = Maintenance(
            [
                PeriodicTask(
                    "requeue expired leases",
                    settings.sweep_interval_seconds,
                    functools.partial(_requeue_expired, db),
                ),
                PeriodicTask(
                    "forget long-gone workers",
                    3600.0,
                    functools.partial(
                        registry.forget_old, db, older_than_seconds=WORKER_ROW_TTL_SECONDS
                    ),
                ),
                # Orphaned images (a worker died between writing and completing) and, when
                # AURASERVE_MEDIA_RETENTION is set, outputs past their retention.
                PeriodicTask(
                    "media sweep and retention",
                    settings.media_sweep_interval_seconds,
                    MediaMaintenance(
                        db,
                        media,
                        grace=settings.media_orphan_grace_seconds,
                        retention=settings.media_retention,
                    ).run,
                ),
            ]
        )
        return cls(
            settings=settings,
            db=db,
            media=media,
            engine=engine,
            maintenance=maintenance,
        )

    def start_maintenance(self) -> None:
        """Run the periodic tasks in this process (idempotent). Every serving process calls
        it: API replicas, API-only `serve --workers 0`, and workers."""
        self.maintenance.start()

    def start_worker(self, models: list[str] | None = None, gpu: str | None = None) -> Worker:
        # Imported here: the worker brings the HTTP client for image inputs, which admin
        # commands and API-only replicas never use.
        from auraserve.worker.loop import Worker

        if self.engine is None:
            raise RuntimeError("no engine loaded")
        self.db.start_listener()
        self.start_maintenance()
        # A configured id names one worker; further in-process workers get -2, -3, ...
        worker_id = self.settings.worker_id or None
        if worker_id and self.workers:
            worker_id = f"{worker_id}-{len(self.workers) + 1}"
        worker = Worker(
            db=self.db,
            settings=self.settings,
            engine=self.engine,
            media=self.media,
            models=models,
            worker_id=worker_id,
            gpu=gpu,
        )
        worker.start()
        self.workers.append(worker)
        if self._stop_watcher is None:
            self._stop_watcher = threading.Thread(
                target=self._watch_stop, name="stop watcher", daemon=True
            )
            self._stop_watcher.start()
        return worker

    def begin_stop(self) -> None:
        """The process is stopping (a first SIGTERM/SIGINT). Only sets an event, so it is safe
        in a signal handler; the stop watcher then tells the workers to claim nothing more,
        and SSE streams end at their next wake-up."""
        self.stopping.set()

    def _watch_stop(self) -> None:
        self.stopping.wait()
        self._stop_workers_claiming()

    def _stop_workers_claiming(self) -> None:
        if self._stop_deadline is None:
            # The grace counts from the first signal, not from when close() gets to it.
            self._stop_deadline = time.monotonic() + self.settings.stop_grace_seconds
        for worker in list(self.workers):
            worker.request_stop()

    def bootstrap_key(self, credits: int) -> keys.CreatedKey | None:
        """On an empty store, make one account and key so a first user can start at once."""
        if keys.count_keys(self.db) > 0:
            return None
        return keys.create_account(self.db, "default", credits=credits)

    def close(self) -> None:
        """Stop workers gracefully (the batch in hand finishes within the grace, the rest is
        handed back), then the maintenance tasks, then close the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stopping.set()
        self._stop_workers_claiming()
        for worker in self.workers:
            remaining = max(0.0, (self._stop_deadline or 0.0) - time.monotonic())
            worker.stop(remaining, hurry=self.hurry)
        self.workers.clear()
        self.maintenance.stop()
        self.db.dispose()
        self.media.close()
