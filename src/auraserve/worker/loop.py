"""The worker: claim → run a batch → store images → settle, with heartbeats and a graceful stop.

One worker drives one engine (one GPU). It never parses HTTP; it only talks to the store, the
engine and the media store. Progress writes double as heartbeats; a background heartbeat keeps
leases alive through long steps (the first step may include compilation). Any worker also
rescues jobs whose worker died (`recover_expired`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from auraserve.config import Settings
from auraserve.core.ids import short_id
from auraserve.core.jobs import Job, JobStatus
from auraserve.engine.base import Engine, JobResult
from auraserve.errors import JobCancelled, UnsupportedRequest
from auraserve.media.encode import encode_image, generation_metadata
from auraserve.media.storage import MediaStore, new_media_name
from auraserve.store import jobs
from auraserve.store.db import Database
from auraserve.webhooks.ssrf import AddressPolicy
from auraserve.worker.inputs import FetchPolicy, load_inputs

log = logging.getLogger(__name__)

# Progress is written at most this often (plus always on the last step): a write per step is
# fine at real-model speeds (~0.1 s/step) but would dominate with the tiny test model.
_PROGRESS_MIN_INTERVAL = 0.1


class WorkerState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPED = "stopped"


@dataclass
class _Batch:
    jobs: list[Job]
    owned: set[str]
    cancelled: set[str] = field(default_factory=set)
    last_progress: float = 0.0


class Worker:
    def __init__(
        self,
        *,
        db: Database,
        settings: Settings,
        engine: Engine,
        media: MediaStore,
        models: Sequence[str] | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.engine = engine
        self.media = media
        self.models = list(models if models is not None else settings.presets)
        self.worker_id = worker_id or f"{socket.gethostname()}:{short_id('w', 4)}"
        self.state = WorkerState.STARTING
        self.jobs_done = 0
        self.warmup_seconds: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # Lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, name=f"worker-{self.worker_id}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in hand (up to `timeout`), then stop claiming."""
        self._stop.set()
        self.db.bus.wake_workers()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        sizes = self.settings.warmup_size_pairs
        warmup = getattr(self.engine, "warmup", None)
        if sizes and warmup is not None:
            # Compile and warm up before claiming anything, so no user request pays for it;
            # the worker reports ready only afterwards (see /health).
            self.warmup_seconds = warmup(sizes)
            log.info("worker %s warmed up %s in %.1f s", self.worker_id, sizes, self.warmup_seconds)
        self.state = WorkerState.READY
        last_recovery = 0.0
        recovery_every = max(self.settings.lease_seconds / 3, 0.5)
        log.info("worker %s ready: %s", self.worker_id, self.engine.description)
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now - last_recovery >= recovery_every:
                    last_recovery = now
                    jobs.recover_expired(self.db)
                seen = self.db.bus.work_seq()
                batch = jobs.claim(
                    self.db,
                    worker_id=self.worker_id,
                    models=self.models,
                    max_images=self.settings.max_batch,
                    lease_seconds=self.settings.lease_seconds,
                )
                if not batch:
                    self.db.bus.wait_for_work(seen, self.settings.poll_interval_seconds)
                    continue
                self.state = WorkerState.BUSY
                self.run_batch(batch)
                self.state = WorkerState.READY
            except Exception:  # the loop must survive a store hiccup; leases protect jobs
                log.exception("worker loop error; retrying shortly")
                self._stop.wait(1.0)
        self.state = WorkerState.STOPPED

    # One batch -----------------------------------------------------------------------------

    def run_batch(self, claimed: list[Job]) -> None:
        batch = _Batch(jobs=claimed, owned={j.id for j in claimed})
        stop_heartbeat = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat, args=(batch, stop_heartbeat), daemon=True
        )
        heartbeat.start()
        try:
            self._progress(
                batch,
                step=0,
                total=claimed[0].request.steps,
                force=True,
                log_line=f"started on {self.worker_id} (attempt {claimed[0].attempts})",
            )
            # Image-to-image inputs are fetched and decoded here; a bad one fails its own job.
            inputs = load_inputs(claimed, self._fetch_policy())
            for failed, error in inputs.failed:
                self._finish(batch, failed, JobStatus.FAILED, error)
            claimed = batch.jobs = inputs.jobs
            if not claimed:
                results = []
            elif inputs.any_image:
                results = self.engine.generate(
                    [j.request for j in claimed],
                    on_step=lambda step, total: self._progress(batch, step, total),
                    cancelled=lambda: self._cancelled_indexes(batch),
                    init_images=inputs.images,
                )
            else:
                results = self.engine.generate(
                    [j.request for j in claimed],
                    on_step=lambda step, total: self._progress(batch, step, total),
                    cancelled=lambda: self._cancelled_indexes(batch),
                )
        except JobCancelled:
            results = None
        except UnsupportedRequest as exc:
            # Only the engine's own verdict means "your request was bad"; a ValueError from deep
            # inside torch is a server fault like any other exception (ERROR below).
            self._finish_all(batch, JobStatus.FAILED, str(exc))
            return
        except Exception as exc:
            log.error("engine failure: %s", traceback.format_exc())
            self._finish_all(batch, JobStatus.ERROR, f"engine failure: {type(exc).__name__}: {exc}")
            return
        finally:
            stop_heartbeat.set()
            heartbeat.join()
        if results is None:
            self._finish_all(batch, JobStatus.CANCELLED, "cancelled by the client")
            return
        for job, result in zip(claimed, results, strict=True):
            self._settle(batch, job, result)

    def _fetch_policy(self) -> FetchPolicy:
        # The webhooks' guard and allow list: one operator decision for every outbound fetch.
        return FetchPolicy(
            addresses=AddressPolicy(self.settings.webhook_allow_hosts),
            allow_http=self.settings.webhook_allow_http,
        )

    def _settle(self, batch: _Batch, job: Job, result: JobResult) -> None:
        if job.id not in batch.owned:
            return
        if result.cancelled or job.id in batch.cancelled:
            self._finish(batch, job, JobStatus.CANCELLED, "cancelled by the client")
            return
        req = job.request
        names: list[str] = []
        try:
            for image, seed in zip(result.images, result.seeds, strict=True):
                data = encode_image(
                    image,
                    req.output_format,
                    req.output_quality,
                    metadata=_image_metadata(job, seed, result),
                )
                name = new_media_name(req.output_format)
                self.media.put(name, data)
                names.append(name)
        except Exception as exc:
            for name in names:
                self.media.delete(name)
            self._finish(batch, job, JobStatus.ERROR, f"could not store the image: {exc}")
            return
        output = {
            "media": names,
            "media_type": req.media_type,
            "seeds": result.seeds,
            "width": result.width,
            "height": result.height,
            "prompt_used": result.prompt_used,
            "warnings": result.warnings,
        }
        done = jobs.complete(
            self.db,
            worker_id=self.worker_id,
            job_id=job.id,
            output=output,
            engine_seconds=result.engine_seconds,
        )
        if done is None:  # lost the lease meanwhile: the job is someone else's now
            for name in names:
                self.media.delete(name)
        else:
            self.jobs_done += 1

    def _finish(self, batch: _Batch, job: Job, status: JobStatus, error: str | None) -> None:
        if job.id in batch.owned:
            jobs.finish_unsuccessful(
                self.db, worker_id=self.worker_id, job_id=job.id, status=status, error=error
            )
            batch.owned.discard(job.id)

    def _finish_all(self, batch: _Batch, status: JobStatus, error: str) -> None:
        for job in batch.jobs:
            if job.id in batch.cancelled:
                self._finish(batch, job, JobStatus.CANCELLED, "cancelled by the client")
            else:
                self._finish(batch, job, status, error)

    # Progress, heartbeats and cancellation ------------------------------------------------

    def _progress(
        self,
        batch: _Batch,
        step: int,
        total: int,
        *,
        force: bool = False,
        log_line: str | None = None,
    ) -> None:
        now = time.monotonic()
        if not force and step < total and now - batch.last_progress < _PROGRESS_MIN_INTERVAL:
            return
        batch.last_progress = now
        self._sync(batch, step=step, total=total, log_line=log_line)

    def _heartbeat(self, batch: _Batch, stop: threading.Event) -> None:
        while not stop.wait(self.settings.heartbeat_seconds):
            try:
                self._sync(batch, step=None, total=None)
            except Exception:
                log.exception("heartbeat failed; will retry")

    def _sync(
        self, batch: _Batch, *, step: int | None, total: int | None, log_line: str | None = None
    ) -> None:
        with self._lock:
            active = [j for j in batch.owned if j not in batch.cancelled]
            if not active:
                return
            ours, cancel = jobs.report_progress(
                self.db,
                worker_id=self.worker_id,
                job_ids=active,
                step=step,
                total=total,
                lease_seconds=self.settings.lease_seconds,
                log=log_line,
            )
            lost = set(active) - ours
            if lost:
                log.warning("lost the lease on %s; dropping them", sorted(lost))
                batch.owned -= lost
            for job in batch.jobs:
                if job.id in cancel and job.id not in batch.cancelled:
                    # Settle a cancelled job at once so its client hears within one step;
                    # its rows keep computing only if other jobs share the batch.
                    batch.cancelled.add(job.id)
                    self._finish(batch, job, JobStatus.CANCELLED, "cancelled by the client")

    def _cancelled_indexes(self, batch: _Batch) -> set[int]:
        return {
            i
            for i, job in enumerate(batch.jobs)
            if job.id in batch.cancelled or job.id not in batch.owned
        }


def _image_metadata(job: Job, seed: int, result: JobResult) -> dict[str, object]:
    # The one metadata builder (media.encode) writes the names its reader parses back, so the
    # parameters text carries the CFG scale like every other field.
    meta = generation_metadata(job.request, seed=seed, prompt_used=result.prompt_used)
    meta.update(width=result.width, height=result.height, request_id=job.request_id)
    return meta
