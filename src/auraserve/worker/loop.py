"""The worker: claim → run a batch → store images → settle, with heartbeats and a graceful stop.

One worker drives one engine (one GPU). It never parses HTTP; it only talks to the store, the
engine and the media store. Progress writes double as heartbeats; a background heartbeat keeps
leases alive through long steps (the first step may include compilation). Jobs whose worker
died are rescued by every serving process's maintenance task (runtime.py), not here.

The worker registers itself (store.workers) and refreshes its row every heartbeat_seconds,
busy or idle, so any process knows which models some live worker serves.

Stopping: `request_stop` ends claiming and lets the batch in hand run on; `stop` waits for it
up to the grace, then `hand_back_now` returns its jobs to the queue without spending an attempt
and makes the engine's `cancelled` callback report every job, so the engine stops at its next
step (JobCancelled) and the worker settles nothing. A client's cancel stays a CANCELLED job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from auraserve.config import Settings
from auraserve.core.ids import short_id
from auraserve.core.jobs import Job, JobStatus
from auraserve.engine.base import Engine, JobResult
from auraserve.errors import (
    CheckpointMismatch,
    JobCancelled,
    StoreUnavailable,
    UnsupportedRequest,
)
from auraserve.media.encode import encode_image, generation_metadata
from auraserve.media.storage import MediaStore, new_media_name
from auraserve.observability import metrics
from auraserve.observability.logs import OutageLog
from auraserve.store import jobs
from auraserve.store import media as media_rows
from auraserve.store import workers as registry
from auraserve.store.db import Store
from auraserve.worker.checkpoints import Checkpointer
from auraserve.worker.inputs import Inputs, load_inputs
from auraserve.worker.previews import Previewer

log = logging.getLogger(__name__)

# Progress is written at most this often (plus always on the last step): a write per step is
# fine at real-model speeds (~0.1 s/step) but would dominate with the tiny test model.
_PROGRESS_MIN_INTERVAL = 0.1
# After a hand-back the engine still finishes the step it is in; wait this long for it.
_ABORT_JOIN_SECONDS = 10.0


class WorkerState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"
    STOPPED = "stopped"


def default_worker_id() -> str:
    return f"{socket.gethostname()[:80]}:{short_id('w', 4)}"


def _device_type(engine: Engine) -> str:
    """ "cpu", "cuda", "mps"; the engine's description says it, e.g. "tiny (cpu, float32)"."""
    device = getattr(engine, "device", None)
    if device is not None:
        return str(getattr(device, "type", device))
    return "unknown"


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
        db: Store,
        settings: Settings,
        engine: Engine,
        media: MediaStore,
        models: Sequence[str] | None = None,
        worker_id: str | None = None,
        gpu: str | None = None,
    ) -> None:
        """`gpu`: the GPU this worker's process is pinned to (`--gpus`), as its
        CUDA_VISIBLE_DEVICES names it; it joins the device in the registry and the metrics."""
        self.db = db
        self.settings = settings
        self.engine = engine
        self.media = media
        self.models = list(models if models is not None else settings.presets)
        self.worker_id = worker_id or default_worker_id()
        self.gpu = gpu
        self.device = engine.description + (f", GPU {gpu}" if gpu is not None else "")
        # The metrics' device label: short and stable (one series per GPU, not per weights).
        self.device_label = f"gpu{gpu}" if gpu is not None else _device_type(engine)
        self.state = WorkerState.STARTING
        self.jobs_done = 0
        self.warmup_seconds: float | None = None
        self._stop = threading.Event()  # claim nothing more
        self._abort = threading.Event()  # the batch in hand was handed back: stop the engine
        self._started = threading.Event()
        self._done = threading.Event()
        self._quiet = threading.Event()  # ends the presence heartbeat
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._batch: _Batch | None = None
        # A database outage is logged once, whichever of the worker's threads meets it first
        # (the loop, a batch's progress or heartbeat, the presence heartbeat).
        self._outage = OutageLog(log, f"worker {self.worker_id}")
        # Step checkpoints and live previews, where the engine takes them (`--parallel` groups
        # do not yet).
        resumable = bool(getattr(engine, "supports_checkpoints", False))
        self._previewer: Previewer | None = None
        if settings.preview_every_steps > 0 and resumable:
            self._previewer = Previewer(
                db=db,
                worker_id=self.worker_id,
                every_steps=settings.preview_every_steps,
                outage=self._outage,
            )
        self._checkpointer: Checkpointer | None = None
        if settings.checkpoint_seconds > 0 and resumable:
            self._checkpointer = Checkpointer(
                db=db,
                media=media,
                worker_id=self.worker_id,
                interval=settings.checkpoint_seconds,
                outage=self._outage,
            )

    # Lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, name=f"worker-{self.worker_id}", daemon=True
        )
        self._thread.start()

    @property
    def finished(self) -> bool:
        """`run` has returned (stopped, or failed to start)."""
        return self._done.is_set()

    def request_stop(self) -> None:
        """Claim nothing more; the batch in hand runs on. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self.state != WorkerState.STOPPED:
            self.state = WorkerState.STOPPING
        self.db.bus.wake_workers()

    def stop(self, grace: float | None = None, *, hurry: threading.Event | None = None) -> bool:
        """Graceful stop: claim nothing more, let the batch in hand finish for up to `grace`
        seconds (default AURASERVE_STOP_GRACE_SECONDS), then hand what is unfinished back to
        the queue. `hurry` set (a second signal) cuts the grace short. True once `run` ended."""
        grace = self.settings.stop_grace_seconds if grace is None else grace
        self.request_stop()
        if not self._started.is_set():
            return True
        deadline = time.monotonic() + grace
        while not self._done.is_set() and not (hurry is not None and hurry.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._done.wait(min(remaining, 0.05))
        if not self._done.is_set():
            self.hand_back_now()
            self._done.wait(_ABORT_JOIN_SECONDS)
        if not self._done.is_set():
            # The engine is inside one long step. Its jobs are back in the queue and every
            # write it could still make is fenced, so the process may exit without it.
            log.warning("worker %s: engine still in a step; leaving it", self.worker_id)
            self._goodbye()
            return False
        return True

    def hand_back_now(self) -> list[str]:
        """Give the jobs in hand back to the queue now (attempt not spent) and stop the engine
        at its next step. Safe from any thread; returns the ids requeued."""
        self.request_stop()
        self._abort.set()
        with self._lock:
            batch = self._batch
            if batch is None:
                return []
            ids = [j.id for j in batch.jobs if j.id in batch.owned and j.id not in batch.cancelled]
            # Out of `owned` first: no heartbeat, progress or settle touches them from now on.
            batch.owned.difference_update(ids)
        if not ids:
            return []
        try:
            requeued = jobs.hand_back(self.db, worker_id=self.worker_id, job_ids=ids)
        except Exception as exc:
            # Their leases lapse instead and any process's lease rescue requeues them.
            log.error("worker %s: could not hand back %s: %r", self.worker_id, ids, exc)
            return []
        log.warning("worker %s stopping: handed back to the queue %s", self.worker_id, requeued)
        return requeued

    def run(self) -> None:
        self._started.set()
        self._register()
        presence = threading.Thread(
            target=self._presence, name=f"presence-{self.worker_id}", daemon=True
        )
        presence.start()
        try:
            self._serve()
        finally:
            self.state = WorkerState.STOPPED
            self._quiet.set()
            presence.join()
            self._goodbye()
            self._done.set()  # last: whoever waits may close the store now

    def _serve(self) -> None:
        sizes = self.settings.warmup_size_pairs
        warmup = getattr(self.engine, "warmup", None)
        if sizes and warmup is not None and not self._stop.is_set():
            # Compile and warm up before claiming anything, so no user request pays for it;
            # the worker reports ready only afterwards (see /health).
            self.warmup_seconds = warmup(sizes)
            log.info("worker %s warmed up %s in %.1f s", self.worker_id, sizes, self.warmup_seconds)
        self.state = self._idle_state()
        with contextlib.suppress(Exception):  # the presence heartbeat retries and logs
            self._beat()  # "ready" shows at once, not a heartbeat later
        log.info("worker %s ready: %s", self.worker_id, self.engine.description)
        failing = False
        while not self._stop.is_set():
            try:
                seen = self.db.bus.work_seq()
                batch = jobs.claim(
                    self.db,
                    worker_id=self.worker_id,
                    models=self.models,
                    max_images=self.settings.max_batch,
                    lease_seconds=self.settings.lease_seconds,
                )
                self._outage.recovered()
                if failing:
                    log.info("worker %s: the store answers again", self.worker_id)
                    failing = False
                if not batch:
                    self.db.bus.wait_for_work(seen, self.settings.poll_interval_seconds)
                    continue
                self.state = WorkerState.BUSY
                try:
                    self.run_batch(batch)
                finally:
                    self.state = self._idle_state()
            except StoreUnavailable as exc:  # the jobs in hand are left to their leases
                self._outage.failed(exc)
                self._stop.wait(1.0)
            except Exception:  # the loop must survive a store hiccup; leases protect jobs
                # Once per failing streak (a database outage would print a traceback a second).
                if not failing:
                    log.exception("worker %s: loop error; retrying every second", self.worker_id)
                failing = True
                self._stop.wait(1.0)

    def _idle_state(self) -> WorkerState:
        return WorkerState.STOPPING if self._stop.is_set() else WorkerState.READY

    # The registry (store.workers) ---------------------------------------------------------

    def _register(self) -> None:
        try:
            registry.register(
                self.db,
                worker_id=self.worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                models=self.models,
                device=self.device,
                state=self.state.value,
            )
        except Exception as exc:  # the presence heartbeat registers it once the store answers
            log.error("worker %s: could not register: %r", self.worker_id, exc)

    def _presence(self) -> None:
        """Refresh the registry row every heartbeat_seconds, busy or idle."""
        failing = False
        while not self._quiet.wait(self.settings.heartbeat_seconds):
            try:
                self._beat()
            except StoreUnavailable as exc:
                self._outage.failed(exc)
            except Exception as exc:
                if not failing:
                    log.error("worker %s: registry heartbeat failed: %r", self.worker_id, exc)
                failing = True
            else:
                failing = False

    def _beat(self) -> None:
        if not registry.heartbeat(
            self.db, self.worker_id, state=self.state.value, jobs_done=self.jobs_done
        ):
            self._register()  # the first registration failed, or the row was pruned

    def _goodbye(self) -> None:
        try:
            registry.mark_stopped(self.db, self.worker_id, jobs_done=self.jobs_done)
        except Exception as exc:  # it goes stale instead, after worker_stale_seconds
            log.error("worker %s: could not mark itself stopped: %r", self.worker_id, exc)

    # One batch -----------------------------------------------------------------------------

    def run_batch(self, claimed: list[Job]) -> None:
        batch = _Batch(jobs=claimed, owned={j.id for j in claimed})
        with self._lock:
            self._batch = batch
        try:
            self._run_batch(batch, claimed)
        finally:
            with self._lock:
                self._batch = None

    def _run_batch(self, batch: _Batch, claimed: list[Job]) -> None:
        # The heartbeat runs until every job is settled, not just generated: encoding and
        # uploading a batch's images can outlast a lease, and a job whose lease lapsed then
        # would be requeued and run twice while its worker is still alive.
        stop_heartbeat = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat, args=(batch, stop_heartbeat), daemon=True
        )
        heartbeat.start()
        try:
            self._generate_and_settle(batch, claimed)
        finally:
            stop_heartbeat.set()
            heartbeat.join()

    def _generate_and_settle(self, batch: _Batch, claimed: list[Job]) -> None:
        try:
            self._progress(
                batch,
                step=0,
                total=claimed[0].request.steps,
                force=True,
                log_line=f"started on {self.worker_id} (attempt {claimed[0].attempts})",
            )
            # Image-to-image inputs are fetched and decoded here; a bad one fails its own job.
            # Through the process's one outbound policy, the webhooks' guard and allow list.
            inputs = load_inputs(claimed, self.settings.outbound)
            for failed, error in inputs.failed:
                self._finish(batch, failed, JobStatus.FAILED, error)
            claimed = batch.jobs = inputs.jobs
            results = self._run_engine(batch, inputs) if claimed else []
        except JobCancelled:
            results = None
        except UnsupportedRequest as exc:
            # Only the engine's own verdict means "your request was bad"; a ValueError from deep
            # inside torch is a server fault like any other exception (ERROR below).
            self._finish_all(batch, JobStatus.FAILED, str(exc))
            return
        except StoreUnavailable as exc:
            # The database, not the engine: nothing can be settled now, and the jobs are not
            # at fault. Their leases lapse and the sweep queues them again (or another worker
            # finishes them), so they are neither lost nor failed.
            self._outage.failed(exc)
            return
        except Exception as exc:
            log.error("engine failure: %s", traceback.format_exc())
            self._finish_all(batch, JobStatus.ERROR, f"engine failure: {type(exc).__name__}: {exc}")
            return
        if results is None:
            if self._abort.is_set():
                return  # stopped by `hand_back_now`: its jobs are queued again, not cancelled
            self._finish_all(batch, JobStatus.CANCELLED, "cancelled by the client")
            return
        if results:  # auraserve_worker_batch_size and _steps_per_second
            metrics.observe_batch(
                claimed[0].model_id,
                len(claimed),
                claimed[0].request.steps,
                results[0].engine_seconds,
                device=self.device_label,
            )
        for job, result in zip(claimed, results, strict=True):
            self._settle(batch, job, result)

    def _run_engine(self, batch: _Batch, inputs: Inputs) -> list[JobResult]:
        """Run the claimed batch: in one engine call, or, with step checkpoints, one call per
        group of jobs that resume at the same step (`worker.checkpoints`)."""
        everything = list(range(len(batch.jobs)))
        checkpointer = self._checkpointer
        if checkpointer is None:
            hooks = self._previewer.hooks(batch.jobs) if self._previewer is not None else {}
            return self._engine_call(batch, everything, inputs, hooks)
        groups = checkpointer.groups(batch.jobs, inputs.images)
        results: dict[int, JobResult] = {}
        for group in groups:
            members = [batch.jobs[i] for i in group.indexes]
            checkpointer.mark_resumed(members, group.resume_step)
            extra: dict[str, Any] = checkpointer.saver(members).hooks()
            if self._previewer is not None:
                extra.update(self._previewer.hooks(members))
            if group.resume_from is not None:
                extra["resume_from"] = group.resume_from
                log.info("jobs %s resume at step %d", [j.id for j in members], group.resume_step)
            try:
                try:
                    outcome = self._engine_call(batch, group.indexes, inputs, extra)
                except CheckpointMismatch as exc:  # e.g. a step cache runs: start over
                    if group.resume_from is None:
                        raise
                    log.warning("jobs %s start over: %s", [j.id for j in members], exc)
                    checkpointer.mark_resumed(members, None)
                    del extra["resume_from"]
                    outcome = self._engine_call(batch, group.indexes, inputs, extra)
            except JobCancelled:
                if len(groups) == 1 or self._abort.is_set():
                    raise
                outcome = [_cancelled_result() for _ in group.indexes]
            results.update(zip(group.indexes, outcome, strict=True))
        return [results[i] for i in everything]

    def _engine_call(
        self, batch: _Batch, indexes: list[int], inputs: Inputs, extra: dict[str, Any]
    ) -> list[JobResult]:
        def cancelled() -> set[int]:
            dropped = self._cancelled_indexes(batch)
            return {k for k, i in enumerate(indexes) if i in dropped}

        images = [inputs.images[i] for i in indexes]
        if any(image is not None for image in images):
            extra = {**extra, "init_images": images}
        return self.engine.generate(
            [batch.jobs[i].request for i in indexes],
            on_step=lambda step, total: self._progress(batch, step, total),
            cancelled=cancelled,
            **extra,
        )

    def _settle(self, batch: _Batch, job: Job, result: JobResult) -> None:
        if job.id not in batch.owned:
            return
        if result.cancelled or job.id in batch.cancelled:
            self._finish(batch, job, JobStatus.CANCELLED, "cancelled by the client")
            return
        req = job.request
        names: list[str] = []

        def discard(unowned: list[str], why: str) -> None:
            # Images no job will reference. One that cannot be deleted now stays an orphan
            # until the media sweep (media.lifecycle) removes it after its grace period.
            for name in unowned:
                try:
                    self.media.delete(name)
                except Exception as exc:
                    log.error(
                        "job %s: could not delete image %s %s; the media sweep will: %r",
                        job.id,
                        name,
                        why,
                        exc,
                    )

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
            log.error("job %s: could not store its image: %r", job.id, exc, exc_info=True)
            discard(names, "after a failed write")
            self._finish(batch, job, JobStatus.ERROR, f"could not store the image: {exc}")
            return
        output = {
            "media": names,
            "media_type": req.media_type,
            "seeds": result.seeds,
            "width": result.width,
            "height": result.height,
            "prompt_used": result.prompt_used,
            # The request's own notes (a size rounded at submit) come first.
            "warnings": [*req.warnings, *result.warnings],
            "fidelity": result.fidelity,
        }
        try:
            done = jobs.complete(
                self.db,
                worker_id=self.worker_id,
                job_id=job.id,
                output=output,
                engine_seconds=result.engine_seconds,
            )
        except Exception:
            # The completion may or may not have committed (a connection lost at COMMIT).
            # Its media rows tell: images with a row belong to the completed job; the rest
            # belong to nothing. If the store cannot answer now, the sweep decides later.
            try:
                owned = media_rows.owned(self.db, names)
            except Exception as exc:
                log.warning(
                    "job %s: completion failed; %d image(s) left to the media sweep: %r",
                    job.id,
                    len(names),
                    exc,
                )
            else:
                discard([n for n in names if n not in owned], "after a failed completion")
            raise
        with self._lock:  # settled: the heartbeat stops extending its lease
            batch.owned.discard(job.id)
        if done is None:  # lost the lease meanwhile: the job is someone else's now
            discard(names, "after a refused completion")
        else:
            self.jobs_done += 1
            self._forget_extras(job)

    def _finish(self, batch: _Batch, job: Job, status: JobStatus, error: str | None) -> None:
        if job.id in batch.owned:
            jobs.finish_unsuccessful(
                self.db, worker_id=self.worker_id, job_id=job.id, status=status, error=error
            )
            batch.owned.discard(job.id)
            self._forget_extras(job)

    def _forget_extras(self, job: Job) -> None:
        """The job ended: its step checkpoint and live preview are of no more use."""
        if self._checkpointer is not None:
            self._checkpointer.drop(job)
        if self._previewer is not None:
            self._previewer.drop(job)

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
        try:
            self._sync(batch, step=step, total=total, log_line=log_line)
        except StoreUnavailable as exc:
            # Progress is advisory: the batch runs on, and its completion (fenced on the
            # lease) tells whether the store kept the jobs ours through the outage.
            self._outage.failed(exc)

    def _heartbeat(self, batch: _Batch, stop: threading.Event) -> None:
        while not stop.wait(self.settings.heartbeat_seconds):
            try:
                self._sync(batch, step=None, total=None)
            except StoreUnavailable as exc:
                self._outage.failed(exc)
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
        if self._abort.is_set():  # handed back: stop the whole batch at this step
            return set(range(len(batch.jobs)))
        return {
            i
            for i, job in enumerate(batch.jobs)
            if job.id in batch.cancelled or job.id not in batch.owned
        }


def _cancelled_result() -> JobResult:
    return JobResult(images=[], seeds=[], width=0, height=0, prompt_used="", cancelled=True)


def _image_metadata(job: Job, seed: int, result: JobResult) -> dict[str, object]:
    # The one metadata builder (media.encode) writes the names its reader parses back, so the
    # parameters text carries the CFG scale like every other field.
    meta = generation_metadata(
        job.request, seed=seed, prompt_used=result.prompt_used, fidelity=result.fidelity
    )
    meta.update(width=result.width, height=result.height, request_id=job.request_id)
    return meta
