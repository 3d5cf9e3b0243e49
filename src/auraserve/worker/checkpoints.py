"""Step checkpoints, the worker's half: where a claimed job resumes, and saving as it runs.

The engine asks at each step boundary whether a checkpoint is due (`checkpoint_wanted`: the
worker's clock, one every `checkpoint_seconds` at most) and only then hands over each request's
sampler state (`on_checkpoint`): the bytes go into the media store under a fresh name,
then a row fenced on the job's lease names them (`store.checkpoints.save`), then the object the
row named before is deleted. A worker that lost the job writes no row and deletes its object.

At claim time each job's newest checkpoint is read back and checked without torch
(`engine.checkpoint_format`: the digest of the request and its input image, the step); one
that does not fit is ignored and the job starts at step 0. Jobs of one claim resume together
when they stand at the same step; jobs at other steps (or none) run as separate groups, one
after the other, so a claim never waits for a batch to be rebuilt as it crashed.

Saving is best effort: a failure is counted and logged and the batch runs on (the job is
merely less far along if its worker dies), never an engine failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from auraserve.core.jobs import Job
from auraserve.engine.checkpoint_format import CheckpointMismatch, read_header, request_digest
from auraserve.errors import StoreUnavailable
from auraserve.media.storage import CHECKPOINT_SUFFIX, MediaStore, new_media_name
from auraserve.observability import metrics
from auraserve.observability.logs import OutageLog
from auraserve.store import checkpoints
from auraserve.store.db import Store

log = logging.getLogger(__name__)


@dataclass
class Group:
    """Jobs (indexes into the claimed batch) that run in one engine call: from step 0
    (`resume_from` None) or from one step's checkpoints, one per job."""

    indexes: list[int]
    resume_step: int | None = None
    resume_from: list[bytes] | None = None


@dataclass
class Saver:
    """`checkpoint_wanted` and `on_checkpoint` for one engine call: a state is serialised and
    saved only when `checkpoint_seconds` have passed since the last one."""

    owner: Checkpointer
    jobs: Sequence[Job]
    last_saved: float = field(default_factory=time.monotonic)

    def due(self) -> bool:
        """Asked by the engine at a step boundary, before it serialises anything."""
        now = time.monotonic()
        if now - self.last_saved < self.owner.interval:
            return False
        self.last_saved = now
        return True

    def __call__(self, index: int, data: bytes) -> None:
        self.owner.save(self.jobs[index], data, int(read_header(data)["step"]))

    def hooks(self) -> dict[str, Any]:
        """generate's checkpoint arguments."""
        return {"checkpoint_every_steps": 1, "on_checkpoint": self, "checkpoint_wanted": self.due}


class Checkpointer:
    def __init__(
        self,
        *,
        db: Store,
        media: MediaStore,
        worker_id: str,
        interval: float,
        outage: OutageLog,
    ) -> None:
        self.db = db
        self.media = media
        self.worker_id = worker_id
        self.interval = interval
        self._outage = outage

    # Resuming --------------------------------------------------------------------------------

    def groups(self, jobs: Sequence[Job], images: Sequence[Image.Image | None]) -> list[Group]:
        """Split a claimed batch by where each job resumes: from step 0 first, then each
        checkpointed step, oldest first."""
        usable = self._usable(jobs, images)
        fresh = [i for i in range(len(jobs)) if i not in usable]
        by_step: dict[int, list[int]] = {}
        for i, (step, _) in usable.items():
            by_step.setdefault(step, []).append(i)
        groups = [Group(fresh)] if fresh else []
        for step in sorted(by_step):
            indexes = sorted(by_step[step])
            groups.append(Group(indexes, step, [usable[i][1] for i in indexes]))
        return groups

    def _usable(
        self, jobs: Sequence[Job], images: Sequence[Image.Image | None]
    ) -> dict[int, tuple[int, bytes]]:
        try:
            found = checkpoints.of_jobs(self.db, [j.id for j in jobs])
        except StoreUnavailable as exc:
            self._outage.failed(exc)
            return {}
        usable: dict[int, tuple[int, bytes]] = {}
        for i, job in enumerate(jobs):
            record = found.get(job.id)
            if record is None:
                continue
            try:
                data = self.media.get(record.name)
                if data is None:
                    raise CheckpointMismatch("its object is gone")
                header = read_header(data)
                if header.get("request_digest") != request_digest(job.request, images[i]):
                    raise CheckpointMismatch("it is another request's")
                step = int(header["step"])
                if not 0 < step < job.request.steps:
                    raise CheckpointMismatch(f"step {step} is outside the run")
            except Exception as exc:  # a checkpoint is an optimisation: step 0 is always right
                log.warning("job %s: not resuming from checkpoint %s: %s", job.id, record.name, exc)
                continue
            usable[i] = (step, data)
        return usable

    def mark_resumed(self, jobs: Sequence[Job], step: int | None) -> None:
        """The jobs' progress shows where this attempt began; a job that resumed in an
        earlier attempt but starts over now has the old mark cleared."""
        ids = [j.id for j in jobs if step is not None or j.progress_resumed_from is not None]
        if ids:
            checkpoints.mark_resumed(self.db, worker_id=self.worker_id, job_ids=ids, step=step)

    # Saving ----------------------------------------------------------------------------------

    def saver(self, jobs: Sequence[Job]) -> Saver:
        return Saver(self, jobs)

    def save(self, job: Job, data: bytes, step: int) -> None:
        started = time.perf_counter()
        name = new_media_name(CHECKPOINT_SUFFIX)
        try:
            self.media.put(name, data)
            saved = checkpoints.save(
                self.db,
                worker_id=self.worker_id,
                job_id=job.id,
                name=name,
                step=step,
                total=job.request.steps,
                size=len(data),
            )
        except Exception as exc:
            metrics.observe_checkpoint("failed")
            if isinstance(exc, StoreUnavailable):
                self._outage.failed(exc)
            else:
                log.warning("job %s: could not save its step-%d checkpoint: %r", job.id, step, exc)
            self._delete(name)  # unrecorded: if this fails too, the orphan sweep removes it
            return
        if saved is None:  # the job is no longer ours
            metrics.observe_checkpoint("refused")
            self._delete(name)
            return
        metrics.observe_checkpoint("saved", len(data), time.perf_counter() - started)
        if saved.replaced is not None:
            self._delete(saved.replaced)

    def drop(self, job: Job) -> None:
        """The job ended: forget the checkpoint this worker saved for it, if any."""
        try:
            name = checkpoints.drop(self.db, job_id=job.id)
        except Exception as exc:  # the maintenance round drops it (forget_finished)
            log.debug("job %s: checkpoint row left to maintenance: %r", job.id, exc)
            return
        if name is not None:
            self._delete(name)

    def _delete(self, name: str) -> None:
        try:
            self.media.delete(name)
        except Exception as exc:  # owned by no row: the orphan sweep removes it
            log.debug("checkpoint %s left to the orphan sweep: %r", name, exc)
