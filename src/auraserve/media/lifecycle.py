"""Keeping the media store in step with the jobs: the orphan sweep and optional retention.

Both are safe to run from every process at once (API replicas, workers): they only delete
objects no row owns, and retention's row deletion decides which caller deletes which objects.
Runtime runs them on its maintenance timer every `media_sweep_interval_seconds`.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

from auraserve.media.storage import MediaStore
from auraserve.store import checkpoints, previews
from auraserve.store import media as media_rows
from auraserve.store.db import Store

log = logging.getLogger(__name__)

# Names checked against the database per query.
_CHUNK = 500


def sweep_orphans(db: Store, media: MediaStore, *, grace: float, now: float) -> int:
    """Delete objects written before `now - grace` that no job owns; returns how many.

    An image is written before its job completes and owned from the completing transaction on,
    so a young unowned object may be a completion in flight: `grace` must exceed the time
    between a worker's write and its completion (seconds; the default is an hour)."""
    deleted = 0
    candidates = media.names_older_than(now - grace)
    while chunk := list(itertools.islice(candidates, _CHUNK)):
        owned = media_rows.owned(db, chunk)
        for name in chunk:
            if name not in owned:
                media.delete(name)
                deleted += 1
    if deleted:
        log.info("media sweep removed %d object(s) owned by no job", deleted)
    return deleted


def apply_retention(db: Store, media: MediaStore, *, retention: float, now: float) -> int:
    """Delete the outputs of jobs completed more than `retention` seconds ago and mark those
    jobs expired (their status then shows `output: null` and a note); returns how many objects
    were deleted. `retention <= 0` keeps everything."""
    if retention <= 0:
        return 0
    deleted = 0
    while True:
        expired = media_rows.expire_older_than(
            db, cutoff=now - retention, retention=retention, now=now
        )
        if not expired.job_ids:
            break
        # Rows first (committed above), objects second: a crash here leaves objects that no
        # row owns, which the orphan sweep removes; never a live status pointing at nothing.
        for name in expired.names:
            media.delete(name)
        deleted += len(expired.names)
    if deleted:
        log.info("media retention deleted %d object(s) older than %g s", deleted, retention)
    return deleted


def forget_finished_checkpoints(db: Store, media: MediaStore) -> int:
    """Delete the checkpoints of jobs that ended without their worker dropping them (a job the
    lease rescue failed for good, a worker that died at the end); returns how many."""
    deleted = 0
    while names := checkpoints.forget_finished(db):
        for name in names:  # rows first, objects second: a crash leaves orphans for the sweep
            media.delete(name)
        deleted += len(names)
    return deleted


@dataclass(frozen=True)
class MediaMaintenance:
    """One maintenance round's parameters (from the settings), callable by a timer."""

    db: Store
    media: MediaStore
    grace: float
    retention: float

    def run(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        apply_retention(self.db, self.media, retention=self.retention, now=now)
        forget_finished_checkpoints(self.db, self.media)
        previews.forget_finished(self.db)
        sweep_orphans(self.db, self.media, grace=self.grace, now=now)
