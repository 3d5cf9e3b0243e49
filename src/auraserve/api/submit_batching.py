"""An account's submits, sent to the store a batch at a time.

Every submit of an account locks that account's row (the guarded UPDATE that reserves its
credits, `store.ledger`) until its transaction commits, and on PostgreSQL a commit waits for
its WAL flush: one account's submits could not go faster than one per commit, however many
API processes and connections there were (measured: 111-393 submits/s on the 2-core machine,
with the row held ~5.6 ms per submit). So this process keeps at most one transaction of an
account's submits in the store: the submits that arrive meanwhile wait for it and then go
together (`store.submissions.submit`: one transaction, one lock and one flush for all
of them when they all fit; one by one, each with its own answer, when they do not).

Nothing waits for a batch to fill: with the store idle a submit goes at once (after the
requests already read in the same turn of the event loop), so at low load this adds no
latency; batches grow only while the store is busy, which is when one commit for many pays.
Submits with an Idempotency-Key go at once, each a batch of its own (their key row needs its
own transaction: a key race must fail that submit only), through the same store operation.

SQLite store calls run inline on the event loop (`Store.call`), so nothing arrives while
one runs; a batch there is what the event loop read in one turn (the submits of all the
connections that had a request ready), which still spares a write lock, a commit and a
wake-up datagram per submit.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from auraserve.runtime import Runtime
from auraserve.store import submissions
from auraserve.store.jobs import NewJob
from auraserve.store.submissions import Answer, IdempotencyKey, Submitted

__all__ = ["SubmitBatcher"]

# At most this many submits in one transaction: PostgreSQL's statement parameters and one
# transaction's size stay small, and a refused batch retried one by one stays short.
MAX_BATCH = 64

# Submits batch together only when everything but the job itself is the same.
_BatchKey = tuple[str, int, int]  # account id, queue limit, attempts per job


@dataclass(frozen=True)
class _Waiting:
    new_job: NewJob
    answer: asyncio.Future[Answer]


class SubmitBatcher:
    """One per API app (its event loop)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # Per key: the submits waiting for the batch in the store. A key is present exactly
        # while a batch of it is in the store.
        self._waiting: dict[_BatchKey, list[_Waiting]] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def submit(
        self,
        account_id: str,
        new_job: NewJob,
        *,
        max_queued: int,
        max_attempts: int,
        idem: IdempotencyKey | None = None,
    ) -> Submitted:
        """Submit `new_job` for the account; raises QueueLimitReached or InsufficientBalance
        when it does not fit (the refusal `store.submissions.submit` answered it with)."""
        key = (account_id, max_queued, max_attempts)
        if idem is not None:
            [answer] = await self._submit(key, [new_job], idem)
            return _given(answer)
        loop = asyncio.get_running_loop()
        waiting = _Waiting(new_job, loop.create_future())
        queue = self._waiting.get(key)
        if queue is not None:
            queue.append(waiting)  # the next batch takes it along
        else:
            # The task starts after the requests already read in this turn of the event loop
            # (they join the queue first), so even inline SQLite calls go in batches.
            self._waiting[key] = [waiting]
            task = loop.create_task(self._send_batches(key))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return _given(await waiting.answer)

    async def _send_batches(self, key: _BatchKey) -> None:
        """Send what waits for `key`, batch after batch, until nothing does."""
        batch: list[_Waiting] = []
        try:
            while True:
                queue = self._waiting[key]
                batch, self._waiting[key] = queue[:MAX_BATCH], queue[MAX_BATCH:]
                if not batch:
                    break
                await self._send(key, batch)
        finally:
            # Normally empty by now; after an unexpected failure nobody may be left hanging.
            for waiting in [*batch, *self._waiting.pop(key, [])]:
                if not waiting.answer.done():
                    waiting.answer.set_exception(RuntimeError("the submit batch stopped"))

    async def _submit(
        self, key: _BatchKey, new_jobs: list[NewJob], idem: IdempotencyKey | None = None
    ) -> list[Answer]:
        account_id, max_queued, max_attempts = key
        store = self.runtime.db
        return await store.call(
            submissions.submit,
            store,
            account_id=account_id,
            new_jobs=new_jobs,
            max_queued=max_queued,
            max_attempts=max_attempts,
            idem=idem,
        )

    async def _send(self, key: _BatchKey, batch: list[_Waiting]) -> None:
        try:
            answers = await self._submit(key, [w.new_job for w in batch])
        except Exception as exc:  # the store is unreachable (503) or worse: all share it
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(exc)
            return
        for waiting, answer in zip(batch, answers, strict=True):
            # A waiter whose request was cancelled has its future cancelled: nobody reads it.
            with contextlib.suppress(asyncio.InvalidStateError):
                waiting.answer.set_result(answer)


def _given(answer: Answer) -> Submitted:
    if isinstance(answer, Exception):
        raise answer
    return answer
