"""The status object: what `GET /v2/requests/status/{id}` returns and what webhooks POST.

One function renders it so the poll, the SSE stream and the webhook can never disagree.
Field names and shapes follow the hosted Queue API's; `queue_position`, `progress`, `logs`, `seeds`,
`metrics` and the rest are additions that clients of that API can ignore.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from auraserve.core.jobs import Job, JobStatus


def iso(ts: float | None) -> str | None:
    """UNIX seconds as `2026-05-22T13:17:32.110Z` (UTC, milliseconds truncated).

    Every poll formats three or four timestamps, and `datetime.strftime` is the costly part,
    so the part up to the seconds is cached per whole second. The whole second is the one
    `datetime.fromtimestamp(ts, UTC)` would show: it rounds to the microsecond (half to even)
    first, so 12.9999996 shows second 13, with the milliseconds still read from `ts` as 999.
    Equal, string for string, to the `datetime` formatting it replaces (tested)."""
    if ts is None:
        return None
    fraction, whole = math.modf(ts)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole += 1.0
    elif micros < 0:
        whole -= 1.0
    return f"{_up_to_seconds(int(whole))}{int(ts * 1000) % 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _up_to_seconds(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


MediaUrl = Callable[[str], str]
"""A media name to the absolute URL a client fetches it by (the media store's `url`: an API
path, a presigned S3 GET or a CDN URL). Passed in: core knows nothing of where images live."""


def retention_note(output: dict[str, Any]) -> str | None:
    """The plain-language note of a job whose outputs retention deleted; None otherwise."""
    expired_at = output.get("expired_at")
    if expired_at is None:
        return None
    retention = output.get("retention_seconds")
    after = f"{retention:g} s " if isinstance(retention, int | float) else ""
    return (
        f"outputs are deleted {after}after completion (AURASERVE_MEDIA_RETENTION); "
        f"these were deleted at {iso(expired_at)}"
    )


def status_body(job: Job, media_url: MediaUrl) -> dict[str, Any]:
    output = None
    note = None
    if job.status == JobStatus.COMPLETED and job.output is not None:
        note = retention_note(job.output)
        if note is None:
            output = {
                "media_url": [media_url(n) for n in job.output["media"]],
                "media_type": job.output["media_type"],
            }
    body: dict[str, Any] = {
        "request_id": job.request_id,
        "status": job.status.value,
        "model_id": job.model_id,
        "error": job.error,
        "output": output,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "completed_at": iso(job.completed_at),
    }
    if note is not None:
        # Not an error: the job did complete (and was charged); its images are gone by policy.
        body["note"] = note
    if job.status == JobStatus.QUEUED:
        body["queue_position"] = job.queue_position
    if job.status == JobStatus.PROCESSING or job.progress_total:
        total = job.progress_total or job.request.steps
        step = job.progress_step
        body["progress"] = {
            "step": step,
            "total_steps": total,
            "total": total,
            "percent": round(100.0 * step / total, 1) if total else 0.0,
        }
        if job.progress_resumed_from is not None:
            # This attempt continued from a step checkpoint instead of starting over.
            body["progress"]["resumed_from"] = job.progress_resumed_from
    if job.logs:
        body["logs"] = [{"timestamp": iso(t), "message": m} for t, m in job.logs]
    if job.output is not None:
        body["seeds"] = job.output.get("seeds")
        body["width"] = job.output.get("width")
        body["height"] = job.output.get("height")
        body["prompt"] = job.output.get("prompt_used")
        if job.output.get("warnings"):
            body["warnings"] = job.output["warnings"]
        if "fidelity" in job.output:
            # How the images were computed: {"exact": true} or {"exact": false, "lossy": [...]}.
            body["fidelity"] = job.output["fidelity"]
    if job.engine_seconds is not None:
        body["metrics"] = {"inference_time": round(job.engine_seconds, 4)}
    return body
