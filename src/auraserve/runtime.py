"""The running parts of one auraserve process, opened and closed together.

`serve` builds one with an engine (API + in-process worker), `worker` one without the API, the
CLI's admin commands one with neither. Tests build them with the tiny model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from auraserve.config import Settings
from auraserve.engine.base import Engine
from auraserve.media.storage import LocalMediaStore
from auraserve.store import keys
from auraserve.store.credentials import ServerKey, load_server_key
from auraserve.store.db import Database
from auraserve.webhooks import outbox

if TYPE_CHECKING:
    from auraserve.api.ratelimit import RateLimiter
    from auraserve.webhooks.outbox import Dispatcher
    from auraserve.worker.loop import Worker

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    db: Database
    media: LocalMediaStore
    engine: Engine | None = None
    workers: list[Worker] = field(default_factory=list)
    # Set by the API's lifespan (they live on its event loop): the webhook dispatcher and the
    # per-account rate limiter. Worker-only processes have neither.
    outbox: Dispatcher | None = None
    limiter: RateLimiter | None = None
    # The key webhook secrets derive from (store.credentials); None only for hand-built ones.
    server_key: ServerKey | None = None

    @classmethod
    def open(cls, settings: Settings, *, engine: Engine | None = None) -> Runtime:
        # 0700: the data dir holds the server key, the database and every image.
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        server_key = load_server_key(
            settings.secret_key.get_secret_value() if settings.secret_key else None,
            settings.secret_key_file,
            settings.data_dir,
        )
        _private_sqlite_files(settings.resolved_database_url)
        db = Database(settings.resolved_database_url)
        keys.use_server_key(db, server_key)
        db.migrate()
        # Every process that changes job statuses records their webhook deliveries in the
        # same transactions (API: cancels; workers: results), whoever sends them later.
        outbox.install(db, settings.webhooks)
        return cls(
            settings=settings,
            db=db,
            media=LocalMediaStore(settings.media_dir),
            engine=engine,
            server_key=server_key,
        )

    def start_worker(self, models: list[str] | None = None) -> Worker:
        # Imported here: the worker brings the HTTP client for image inputs, which admin
        # commands and API-only replicas never use.
        from auraserve.worker.loop import Worker

        if self.engine is None:
            raise RuntimeError("no engine loaded")
        self.db.start_listener()
        worker = Worker(
            db=self.db, settings=self.settings, engine=self.engine, media=self.media, models=models
        )
        worker.start()
        self.workers.append(worker)
        return worker

    def bootstrap_key(self, credits: int) -> keys.CreatedKey | None:
        """On an empty store, make one account and key so a first user can start at once."""
        if keys.count_keys(self.db) > 0:
            return None
        return keys.create_account(self.db, "default", credits=credits)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()
        self.db.dispose()


def _private_sqlite_files(url: str) -> None:
    """Make the SQLite database 0600 before SQLite opens it: SQLite gives its -wal and -shm
    files the database file's mode, so they follow. Files made by an older version (0644)
    are tightened too."""
    if not url.startswith("sqlite"):
        return
    name = url.split(":///", 1)[-1]
    if not name or name == ":memory:" or name.startswith("file:"):
        return
    path = Path(name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)
