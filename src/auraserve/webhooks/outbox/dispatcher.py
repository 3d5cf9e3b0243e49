"""The sending side of the outbox: a dispatcher that delivers due rows after commit.

`Dispatcher` (an asyncio task in each API process) claims due rows, signs them per Standard
Webhooks with the account's `whsec_` secrets (derived from the server key; two while a
rotation's grace period lasts) (the `webhook-id` is the row's `event_id`,
identical across retries), delivers through `webhooks.delivery.deliver` (SSRF checks, pinned
connections) and reschedules failures by `next_delay`: 2xx ends a delivery, 410 disables the
URL for that request, anything else retries on the schedule, honouring Retry-After. Claims set
a lease (`next_attempt_at` in the future) under `FOR UPDATE SKIP LOCKED`, so several API
replicas share the outbox and a crashed one's rows come back.

Sync-mode progress is not a status change, so no transition hook records it: the
dispatcher's ticker does, through the same `enqueue_in` the hook uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

from anyio.to_thread import run_sync
from sqlalchemy import and_, func, select, update

from auraserve.core.jobs import Job, JobStatus
from auraserve.core.status import MediaUrl
from auraserve.errors import StoreUnavailable
from auraserve.observability.logs import OutageLog
from auraserve.store import keys
from auraserve.store.db import Store
from auraserve.store.previews import PREVIEWS_WEBHOOK_MODE
from auraserve.store.schema import accounts, webhook_deliveries
from auraserve.store.schema import jobs as jobs_table
from auraserve.webhooks.delivery import DeliveryResult, deliver, next_delay, webhook_limits
from auraserve.webhooks.outbox.transaction import (
    DELIVERED,
    FAILED,
    GONE,
    OUTBOX_KEY,
    PENDING,
    SYNC_MODE,
    enqueue_in,
    progress_suffix,
    recent_progress_in,
)
from auraserve.webhooks.settings import WebhookSettings
from auraserve.webhooks.signing import signed_headers

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

_POLL_SECONDS = 1.0  # fallback wake-up when a notification is lost
_LEASE_EXTRA = 30.0  # a claimed row returns to the pool this long after its timeout

_W = webhook_deliveries.c


@dataclass(frozen=True)
class _Claimed:
    id: int
    job_id: str
    url: str
    event_id: str
    payload: bytes
    attempts: int
    # The current secret and, during a rotation's grace period, the previous one.
    secrets: tuple[str, ...]


class Dispatcher:
    """Sends due deliveries; one per API process, started and stopped by the app lifespan."""

    def __init__(self, db: Store, settings: WebhookSettings, *, media_url: MediaUrl) -> None:
        self.db = db
        self.settings = settings
        # Renders image URLs in the progress bodies it records (the process's media store).
        self.media_url = media_url
        # The process's one outbound policy (shared with the image fetches), built by Settings.
        self.policy = settings.outbound
        self.limits = webhook_limits(settings.timeout)
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        # The latest send of each job in flight here: a job's next send waits for it, so one
        # process delivers a job's callbacks in the order they were recorded (QUEUED before
        # PROCESSING before COMPLETED) instead of racing them over separate connections.
        self._last_send: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._wake: asyncio.Event | None = None
        self._last_tick = 0.0
        self._outage = OutageLog(log, "webhook outbox")

    # Lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="webhook-outbox")

    async def stop(self, grace: float = 2.0) -> None:
        """Stop claiming; give deliveries in flight `grace` seconds, then cancel them (their
        rows stay leased and are retried after the lease)."""
        self._stopping.set()
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    # Loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        with self.db.bus.watch(OUTBOX_KEY) as wake:
            self._wake = wake
            while not self._stopping.is_set():
                wake.clear()
                delay = _POLL_SECONDS
                try:
                    await self._tick_progress()
                    # A cheap read first: an idle outbox never takes SQLite's write lock.
                    delay = await run_sync(self._until_next_due, _POLL_SECONDS)
                    room = self.settings.concurrency - len(self._inflight)
                    if delay == 0 and room > 0:
                        claimed = await run_sync(self._claim, room)
                        for item in claimed:
                            self._start_send(item)
                        # More may be due (come straight back), or the due rows were taken
                        # by another replica (look again after the poll interval).
                        delay = 0.0 if len(claimed) == room else _POLL_SECONDS
                        if claimed and len(claimed) < room:
                            delay = await run_sync(self._until_next_due, _POLL_SECONDS)
                    elif delay == 0:
                        delay = _POLL_SECONDS  # full: a finishing delivery wakes us
                    self._outage.recovered()
                except StoreUnavailable as exc:  # one line per outage, not one per poll
                    self._outage.failed(exc)
                    delay = _POLL_SECONDS
                except Exception:  # the loop must survive a store hiccup
                    log.exception("webhook dispatcher error; retrying shortly")
                if delay > 0 and not self._stopping.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), delay)
            self._wake = None

    def _start_send(self, item: _Claimed) -> None:
        before = self._last_send.get(item.job_id)
        task = asyncio.get_running_loop().create_task(self._send(item, after=before))
        self._last_send[item.job_id] = task
        self._inflight.add(task)
        task.add_done_callback(functools.partial(self._done, item.job_id))

    def _done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._last_send.get(job_id) is task:
            del self._last_send[job_id]
        if self._wake is not None:
            self._wake.set()  # a slot freed up

    def _until_next_due(self, cap: float) -> float:
        """Seconds until the earliest pending delivery is due, at most `cap`."""
        with self.db.read() as conn:
            due = conn.execute(
                select(func.min(_W.next_attempt_at)).where(_W.state == PENDING)
            ).scalar_one_or_none()
        if due is None:
            return cap
        return max(0.0, min(cap, float(due) - time.time()))

    # Claim, send, record -------------------------------------------------------------------

    def _claim(self, limit: int) -> list[_Claimed]:
        now = time.time()
        lease_until = now + self.settings.timeout + _LEASE_EXTRA
        with self.db.write() as conn:
            rows = conn.execute(
                select(_W.id)
                .where(_W.state == PENDING, _W.next_attempt_at <= now)
                .order_by(_W.next_attempt_at, _W.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return []
            ids = [r.id for r in rows]
            conn.execute(
                update(webhook_deliveries).where(_W.id.in_(ids)).values(next_attempt_at=lease_until)
            )
            claimed = conn.execute(
                select(
                    _W.id,
                    _W.job_id,
                    _W.url,
                    _W.event_id,
                    _W.payload,
                    _W.attempts,
                    _W.account_id,
                    accounts.c.webhook_secret_version,
                    accounts.c.webhook_previous_version,
                    accounts.c.webhook_previous_until,
                )
                .join(accounts, accounts.c.id == _W.account_id)
                .where(_W.id.in_(ids))
                .order_by(_W.id)
            ).all()
        key = self.db.server_key
        return [
            _Claimed(
                r.id,
                r.job_id,
                r.url,
                r.event_id,
                r.payload.encode(),
                r.attempts,
                keys.signing_secrets(
                    key,
                    r.account_id,
                    r.webhook_secret_version,
                    r.webhook_previous_version,
                    r.webhook_previous_until,
                    now,
                ),
            )
            for r in claimed
        ]

    async def _send(self, item: _Claimed, *, after: asyncio.Task[None] | None = None) -> None:
        if after is not None:
            # Whatever became of it (delivered, rescheduled, crashed): a failed earlier
            # callback is retried on its schedule and does not hold this one back.
            await asyncio.wait([after])
        try:
            headers = signed_headers(item.secrets, item.event_id, item.payload)
            result = await deliver(
                item.url,
                item.payload,
                headers,
                policy=self.policy,
                limits=self.limits,
            )
        except Exception as exc:  # deliver() does not raise for network trouble; a bug might
            log.exception("webhook delivery %s crashed", item.event_id)
            result = DeliveryResult(outcome="retry", error=f"internal error: {exc}")
        try:
            await run_sync(self._record, item, result)
        except Exception:
            log.exception("could not record webhook delivery %s; it will be retried", item.event_id)

    def _record(self, item: _Claimed, result: DeliveryResult) -> None:
        now = time.time()
        attempts = item.attempts + 1
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_status_code": result.status_code,
            "last_error": result.error,
            "updated_at": now,
        }
        with self.db.write() as conn:
            current = conn.execute(
                select(_W.state).where(_W.id == item.id).with_for_update()
            ).scalar_one_or_none()
            if current != PENDING:
                # Superseded (or disabled) while in flight: keep that state, note the attempt.
                conn.execute(update(webhook_deliveries).where(_W.id == item.id).values(**values))
                return
            if result.outcome == "delivered":
                values["state"] = DELIVERED
            elif result.outcome == "gone":
                values["state"] = GONE
                # 410: the receiver does not want this request's callbacks any more.
                conn.execute(
                    update(webhook_deliveries)
                    .where(and_(_W.job_id == item.job_id, _W.state == PENDING, _W.id != item.id))
                    .values(
                        state=GONE,
                        last_error="not sent: the receiver disabled this URL (410 Gone)",
                        updated_at=now,
                    )
                )
            else:
                delay = next_delay(attempts, self.settings.schedule, retry_after=result.retry_after)
                if delay is None:
                    values["state"] = FAILED
                else:
                    values["next_attempt_at"] = now + delay
            conn.execute(update(webhook_deliveries).where(_W.id == item.id).values(**values))
        if result.outcome != "delivered":
            log.info(
                "webhook %s attempt %d: %s (%s)",
                item.event_id,
                attempts,
                result.outcome,
                result.error,
            )

    # Sync-mode progress ---------------------------------------------------------------------

    async def _tick_progress(self) -> None:
        interval = self.settings.sync_interval
        now = time.monotonic()
        if now - self._last_tick < min(interval / 2, _POLL_SECONDS):
            return
        self._last_tick = now
        await run_sync(self._enqueue_progress, interval)

    def _enqueue_progress(self, interval: float) -> None:
        """For every running sync-mode job whose last callback is older than the interval and
        whose progress moved since, enqueue the current status."""
        since = time.time() - interval
        with self.db.read() as conn:
            # Read first, write only for jobs that are due: an idle tick takes no write lock.
            ids = [
                r.id
                for r in conn.execute(
                    select(jobs_table.c.id).where(
                        jobs_table.c.status == JobStatus.PROCESSING.value,
                        jobs_table.c.webhook_mode.in_((SYNC_MODE, PREVIEWS_WEBHOOK_MODE)),
                        jobs_table.c.webhook_url.is_not(None),
                    )
                ).all()
                if not recent_progress_in(conn, r.id, since)
            ]
        for job_id in ids:
            with self.db.write() as conn:
                # Lock the job so its terminal transition (and terminal callback) commits
                # after this progress callback, never before it.
                row = conn.execute(
                    select(jobs_table)
                    .where(
                        jobs_table.c.id == job_id,
                        jobs_table.c.status == JobStatus.PROCESSING.value,
                    )
                    .with_for_update()
                ).first()
                if row is None:
                    continue
                job = Job.from_row(row)
                if recent_progress_in(conn, job.id, time.time() - interval):
                    continue
                enqueue_in(
                    conn,
                    job,
                    suffix=progress_suffix(job),
                    terminal=False,
                    media_url=self.media_url,
                )
