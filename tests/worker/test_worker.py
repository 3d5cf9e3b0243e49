"""The worker against a real store and the tiny engine: readiness, failures, fencing."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from auraserve.config import Settings
from auraserve.core.jobs import JobStatus
from auraserve.core.request import GenerationRequest, build_request
from auraserve.engine.base import JobResult
from auraserve.errors import UnsupportedRequest
from auraserve.media.encode import read_parameters
from auraserve.runtime import Runtime
from auraserve.store import jobs, keys, ledger
from auraserve.worker.loop import Worker, WorkerState
from tests.store_jobs import submit_one

MODEL = "auraflow-v0-3-512"


def _submit(rt: Runtime, account_id: str, **fields: Any) -> str:
    preset = rt.settings.presets[MODEL]
    req = build_request({"prompt": "w", "steps": 2, **fields}, model=MODEL, preset=preset)
    return submit_one(
        rt.db,
        account_id=account_id,
        request=req,
        price=req.price(preset),
        max_queued=100,
        max_attempts=3,
    ).job.id


def _wait(rt: Runtime, job_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.get(rt.db, job_id)
        if job is not None and job.is_terminal:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


class _Raising:
    """An engine that fails the way real engines do, named by its failure (cog's fixtures)."""

    description = "raising test engine"
    is_test_model = True

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def generate(self, requests: Sequence[GenerationRequest], **_: Any) -> list[JobResult]:
        raise self.exc


def test_warmup_runs_before_ready(settings: Settings, tiny_engine: Any) -> None:
    settings = settings.model_copy(update={"warmup_sizes": ["512x512"]})
    rt = Runtime.open(settings, engine=tiny_engine)
    try:
        worker = rt.start_worker()
        assert worker.state in (WorkerState.STARTING, WorkerState.READY)
        deadline = time.monotonic() + 120
        while worker.state != WorkerState.READY:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert worker.warmup_seconds is not None and worker.warmup_seconds > 0
    finally:
        rt.close()


def test_unsupported_request_fails_and_other_errors_error_all_refunded(
    settings: Settings,
) -> None:
    for exc, status in (
        (UnsupportedRequest("cannot draw that"), JobStatus.FAILED),
        # A ValueError raised deep inside torch is a server fault, not the client's mistake.
        (ValueError("expected a tensor of rank 4"), JobStatus.ERROR),
        (RuntimeError("CUDA out of memory"), JobStatus.ERROR),
    ):
        rt = Runtime.open(settings, engine=_Raising(exc))
        try:
            acct = keys.create_account(rt.db, "w", credits=10_000)
            rt.start_worker()
            job = _wait(rt, _submit(rt, acct.account_id))
            assert job.status == status
            assert str(exc) in (job.error or "")
            assert ledger.balance(rt.db, acct.account_id) == 10_000
        finally:
            rt.close()


def test_a_worker_that_lost_its_lease_neither_completes_nor_charges(
    settings: Settings, tiny_engine: Any
) -> None:
    rt = Runtime.open(settings, engine=tiny_engine)
    try:
        acct = keys.create_account(rt.db, "w", credits=10_000)
        job_id = _submit(rt, acct.account_id)
        claimed = jobs.claim(
            rt.db, worker_id="slow", models=[MODEL], max_images=1, lease_seconds=0.05
        )
        time.sleep(0.1)
        assert jobs.recover_expired(rt.db)[0] == [job_id]  # presumed dead, requeued
        # A healthy worker finishes it.
        healthy = Worker(db=rt.db, settings=rt.settings, engine=tiny_engine, media=rt.media)
        thread = threading.Thread(target=healthy.run, daemon=True)
        thread.start()
        done = _wait(rt, job_id)
        healthy.stop()
        assert done.status == JobStatus.COMPLETED
        # The slow worker comes back and runs its stale claim to the end.
        stale = Worker(
            db=rt.db, settings=rt.settings, engine=tiny_engine, media=rt.media, worker_id="slow"
        )
        stale.run_batch(claimed)
        assert stale.jobs_done == 0
        final = jobs.get(rt.db, job_id)
        assert final is not None and final.output == done.output
        kinds = [e["kind"] for e in ledger.entries(rt.db, acct.account_id)]
        assert kinds.count("capture") == 1 and "release" not in kinds
        stored = list(rt.media.root.rglob("*.png"))
        assert len(stored) == 1, "the stale worker's images must be deleted"
    finally:
        rt.close()


def test_stored_images_carry_every_parameter_including_the_cfg_scale(
    settings: Settings, tiny_engine: Any
) -> None:
    rt = Runtime.open(settings, engine=tiny_engine)
    try:
        acct = keys.create_account(rt.db, "w", credits=10_000)
        rt.start_worker()
        for output_format in ("png", "webp", "jpeg"):
            job = _wait(
                rt,
                _submit(
                    rt, acct.account_id, guidance_scale=4.25, seed=11, output_format=output_format
                ),
            )
            assert job.status == JobStatus.COMPLETED, job.error
            path = rt.media.path(job.output["media"][0])
            assert path is not None
            params = read_parameters(path.read_bytes())
            assert params is not None, output_format
            assert params["guidance_scale"] == 4.25, (output_format, params)
            assert params["seed"] == 11 and params["steps"] == 2
            assert params["request_id"] == job.request_id
    finally:
        rt.close()


def test_every_image_says_how_it_was_computed(settings: Settings) -> None:
    """The fidelity label (issue 20): a lossy step cache that skipped calls is named, with its
    settings, in the job's record, its status body (and so its webhook payload) and the
    image's own metadata; a job asking for exact output runs without it and says so."""
    from auraserve.core.engine_options import EngineOptions
    from auraserve.core.status import status_body
    from auraserve.engine.pipeline import AuraFlowEngine
    from auraserve.engine.tiny import build_tiny_pipeline

    # A threshold only random weights need (they change 40–130 % per call): skips for sure.
    options = EngineOptions(step_cache="fbcache", cache_threshold=2.0, cache_warmup=0)
    engine = AuraFlowEngine(build_tiny_pipeline(), description="tiny", options=options)
    rt = Runtime.open(settings, engine=engine)
    try:
        acct = keys.create_account(rt.db, "w", credits=10_000)
        rt.start_worker()
        lossy = _wait(rt, _submit(rt, acct.account_id, steps=6, seed=3))
        exact = _wait(rt, _submit(rt, acct.account_id, steps=6, seed=3, exact=True))
        for job in (lossy, exact):
            assert job.status == JobStatus.COMPLETED, job.error
        label = lossy.output["fidelity"]
        assert label["exact"] is False
        [item] = label["lossy"]
        assert item["option"] == "step_cache" and item["method"] == "fbcache"
        assert item["threshold"] == 2.0 and item["skipped_calls"] > 0
        assert exact.output["fidelity"] == {"exact": True}
        for job in (lossy, exact):
            assert status_body(job, lambda name: name)["fidelity"] == job.output["fidelity"]
            path = rt.media.path(job.output["media"][0])
            assert path is not None
            params = read_parameters(path.read_bytes())
            assert params is not None and params["fidelity"] == job.output["fidelity"]
    finally:
        rt.close()
