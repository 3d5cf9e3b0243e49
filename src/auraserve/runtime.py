"""The running parts of one auraserve process, opened and closed together.

`serve` builds one with an engine (API + in-process worker), `worker` one without the API, the
CLI's admin commands one with neither. Tests build them with the tiny model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from auraserve.config import Settings
from auraserve.engine.base import Engine
from auraserve.media.storage import LocalMediaStore
from auraserve.store import keys
from auraserve.store.db import Database
from auraserve.webhooks import outbox
from auraserve.worker.loop import Worker

if TYPE_CHECKING:
    from auraserve.api.ratelimit import RateLimiter
    from auraserve.webhooks.outbox import Dispatcher

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

    @classmethod
    def open(cls, settings: Settings, *, engine: Engine | None = None) -> Runtime:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_database_url)
        db.migrate()
        # Every process that changes job statuses records their webhook deliveries in the
        # same transactions (API: cancels; workers: results), whoever sends them later.
        outbox.install(db, settings.webhooks)
        return cls(
            settings=settings, db=db, media=LocalMediaStore(settings.media_dir), engine=engine
        )

    def start_worker(self, models: list[str] | None = None) -> Worker:
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
