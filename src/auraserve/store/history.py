"""What an account can see of its own past: its requests, newest first, and where its credits
went. Read-only; every query is scoped to one account, so another account's rows can never
appear (a request id or ledger entry is never looked up without the account id).

Pagination is by keyset, not offset: the cursor names the last item seen (its creation time and
id), so a page costs the same however deep the client has scrolled, and jobs submitted while
paging do not shift later pages.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, and_, func, or_, select

from auraserve.core.jobs import Job, JobStatus, request_id
from auraserve.errors import BadCursor
from auraserve.store.db import Store
from auraserve.store.jobs import ACTIVE, job_in
from auraserve.store.schema import accounts, jobs, ledger

MAX_PAGE = 100
MAX_LEDGER_ENTRIES = 100


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    # Pass back as `cursor` for the next (older) page; None when this page is the last.
    next_cursor: str | None


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    kind: str
    amount: int
    balance_delta: int
    created_at: float
    note: str | None
    # The public id of the request the entry belongs to; None for grants.
    request_id: str | None


@dataclass(frozen=True)
class AccountSummary:
    account_id: str
    name: str
    balance: int
    # Credits held for the account's queued and running requests: already out of `balance`,
    # spent if the request completes, given back otherwise.
    reserved: int
    entries: list[LedgerEntry]


def encode_cursor(created_at: float, job_id: str) -> str:
    raw = json.dumps([created_at, job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise BadCursor("not a cursor returned by this endpoint") from exc
    if (
        isinstance(created_at, bool)
        or not isinstance(created_at, int | float)
        or not isinstance(job_id, str)
        or len(job_id) != 36
    ):
        raise BadCursor("not a cursor returned by this endpoint")
    return float(created_at), job_id


def page_query(
    account_id: str, *, limit: int, cursor: str | None, status: JobStatus | None
) -> Select[Any]:
    """One page of the account's jobs, newest first, plus one row that tells whether another
    page exists (no count). Served by the index `ix_jobs_account_created`, so a page reads
    its own rows however many jobs the account has."""
    query = select(jobs).where(jobs.c.account_id == account_id)
    if status is not None:
        query = query.where(jobs.c.status == status.value)
    if cursor is not None:
        created_at, job_id = decode_cursor(cursor)
        # Spelled out rather than a row-value comparison, which older SQLite lacks in indexes.
        query = query.where(
            or_(
                jobs.c.created_at < created_at,
                and_(jobs.c.created_at == created_at, jobs.c.id < job_id),
            )
        )
    return query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)


def list_jobs(
    db: Store,
    account_id: str,
    *,
    limit: int = 20,
    cursor: str | None = None,
    status: JobStatus | None = None,
) -> Page:
    """The account's jobs, newest first, at most `limit` (1..MAX_PAGE) of them, older than
    `cursor` when given, only those in `status` when given. Raises BadCursor."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be from 1 to {MAX_PAGE}")
    query = page_query(account_id, limit=limit, cursor=cursor, status=status)
    with db.read() as conn:
        rows = conn.execute(query).all()
        found = [job_in(conn, row) for row in rows[:limit]]
    more = len(rows) > limit
    last = found[-1] if found else None
    next_cursor = encode_cursor(last.created_at, last.id) if more and last else None
    return Page(jobs=found, next_cursor=next_cursor)


def account_summary(db: Store, account_id: str, *, entries: int = 20) -> AccountSummary | None:
    """Balance, reserved credits and the `entries` newest ledger entries (newest first), or
    None for an unknown account."""
    if not 0 <= entries <= MAX_LEDGER_ENTRIES:
        raise ValueError(f"entries must be from 0 to {MAX_LEDGER_ENTRIES}")
    reserved = (
        select(func.coalesce(func.sum(jobs.c.price), 0))
        .where(jobs.c.account_id == account_id, jobs.c.status.in_(ACTIVE))
        .scalar_subquery()
    )
    # One statement for balance and reservations: they are read from the same snapshot, so a
    # job settling in between can never show its credits twice or not at all.
    head = select(accounts.c.id, accounts.c.name, accounts.c.balance, reserved.label("reserved"))
    recent = (
        select(ledger, jobs.c.model_id)
        .select_from(
            ledger.outerjoin(
                jobs, and_(jobs.c.id == ledger.c.job_id, jobs.c.account_id == account_id)
            )
        )
        .where(ledger.c.account_id == account_id)
        .order_by(ledger.c.id.desc())
        .limit(entries)
    )
    with db.read() as conn:
        account = conn.execute(head.where(accounts.c.id == account_id)).first()
        if account is None:
            return None
        rows = conn.execute(recent).all() if entries else []
    return AccountSummary(
        account_id=account.id,
        name=account.name,
        balance=int(account.balance),
        reserved=int(account.reserved),
        entries=[
            LedgerEntry(
                id=int(r.id),
                kind=r.kind,
                amount=int(r.amount),
                balance_delta=int(r.balance_delta),
                created_at=float(r.created_at),
                note=r.note,
                request_id=(
                    request_id(r.model_id, r.job_id)
                    if r.job_id is not None and r.model_id is not None
                    else None
                ),
            )
            for r in rows
        ],
    )
