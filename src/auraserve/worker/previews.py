"""Live previews, the worker's half: asks whether anyone watches, and posts what the engine drew.

The engine makes a preview (its latest x0 estimate through a latent-to-RGB projection, ~1 ms a
JPEG) only at the steps where `wanted()` says someone watches one of the batch's jobs; the
store is asked at most once a second. Each watched job's preview replaces its last one
(`store.previews.save`, fenced on the lease), which wakes its streams. Best effort: a failure is
logged and the batch runs on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from auraserve.core.jobs import Job
from auraserve.errors import StoreUnavailable
from auraserve.observability import metrics
from auraserve.observability.logs import OutageLog
from auraserve.store import previews
from auraserve.store.db import Store

log = logging.getLogger(__name__)

ASK_EVERY_SECONDS = 1.0


class Previewer:
    def __init__(self, *, db: Store, worker_id: str, every_steps: int, outage: OutageLog) -> None:
        self.db = db
        self.worker_id = worker_id
        self.every_steps = every_steps
        self._outage = outage

    def hooks(self, jobs: Sequence[Job]) -> dict[str, Any]:
        """generate's preview arguments for one engine call over `jobs`."""
        watching = _Watching(self, [job.id for job in jobs])

        def on_preview(step: int, images: list[list[bytes]]) -> None:
            for job, job_images in zip(jobs, images, strict=True):
                if job.id in watching.ids:
                    self._post(job, step, job_images)

        return {
            "preview_every_steps": self.every_steps,
            "on_preview": on_preview,
            "previews_wanted": watching.any,
        }

    def _post(self, job: Job, step: int, images: list[bytes]) -> None:
        try:
            posted = previews.save(
                self.db,
                worker_id=self.worker_id,
                job_id=job.id,
                step=step,
                total=job.request.steps,
                images=images,
            )
            if posted:
                metrics.PREVIEWS_POSTED.inc()
        except StoreUnavailable as exc:
            self._outage.failed(exc)
        except Exception as exc:
            log.warning("job %s: could not post its step-%d preview: %r", job.id, step, exc)

    def ask(self, job_ids: list[str]) -> set[str]:
        try:
            return previews.wanted(self.db, job_ids)
        except StoreUnavailable as exc:
            self._outage.failed(exc)
        except Exception as exc:
            log.warning("could not ask who watches %s: %r", job_ids, exc)
        return set()

    def drop(self, job: Job) -> None:
        """The job ended: its preview is of no more use."""
        try:
            previews.drop(self.db, job.id)
        except Exception as exc:  # the maintenance round drops it
            log.debug("job %s: preview row left to maintenance: %r", job.id, exc)


class _Watching:
    """Which of a batch's jobs someone watches, asked of the store at most once a second."""

    def __init__(self, previewer: Previewer, job_ids: list[str]) -> None:
        self.previewer = previewer
        self.job_ids = job_ids
        self.ids: set[str] = set()
        self.asked_at: float | None = None

    def any(self) -> bool:
        now = time.monotonic()
        if self.asked_at is None or now - self.asked_at >= ASK_EVERY_SECONDS:
            self.asked_at = now
            self.ids = self.previewer.ask(self.job_ids)
        return bool(self.ids)
