"""What an operator sees and changes across accounts (the `/v2/admin/…` routes): every account
with its balance, usage and keys, the recent jobs of all accounts, and the hand-written ledger
entries (grant, deduct) that record which admin key moved the credits and why.

Unlike `store.history`, nothing here is scoped to one account: only the API's admin check
stands between these functions and a tenant, so they are called from `api.admin_routes` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import case, func, select

from auraserve.core.jobs import Job, JobStatus
from auraserve.store import ledger
from auraserve.store.db import Store
from auraserve.store.jobs import ACTIVE
from auraserve.store.schema import accounts, api_keys, jobs
from auraserve.store.schema import ledger as ledger_table

MAX_ACCOUNTS = 500
MAX_JOBS = 200


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    name: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class Usage:
    requests: int
    completed: int
    images: int
    # Credits captured by completed requests.
    spent: int
    granted: int
    deducted: int
    last_request_at: float | None


@dataclass(frozen=True)
class AccountRow:
    account_id: str
    name: str
    is_admin: bool
    balance: int
    # Held for queued and running requests (already out of `balance`).
    reserved: int
    active_jobs: int
    created_at: float
    usage: Usage
    keys: list[KeyRow]


@dataclass(frozen=True)
class AccountsPage:
    accounts: list[AccountRow]
    total: int


@dataclass(frozen=True)
class JobRow:
    job: Job
    account_name: str


@dataclass(frozen=True)
class JobsPage:
    jobs: list[JobRow]
    # The oldest job's id on this page when older ones exist: pass as `before` for the next.
    next_before: str | None


@dataclass(frozen=True)
class Adjustment:
    account_id: str
    kind: Literal["grant", "deduct"]
    amount: int
    balance: int


def list_accounts(db: Store, *, limit: int = 100, offset: int = 0) -> AccountsPage:
    """Accounts, newest first, each with its balance, reservations, usage totals and keys.

    Usage is summed over the page's accounts' jobs and ledger entries (the per-account
    indexes serve both), so a page costs what its accounts did, not the whole store."""
    if not 1 <= limit <= MAX_ACCOUNTS:
        raise ValueError(f"limit must be from 1 to {MAX_ACCOUNTS}")
    if offset < 0:
        raise ValueError("offset cannot be negative")
    page = (
        select(accounts)
        .order_by(accounts.c.created_at.desc(), accounts.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    with db.read() as conn:
        total = int(conn.execute(select(func.count()).select_from(accounts)).scalar_one())
        rows = conn.execute(page).all()
        ids = [r.id for r in rows]
        job_usage = {
            r.account_id: r
            for r in conn.execute(
                select(
                    jobs.c.account_id,
                    func.count().label("requests"),
                    func.sum(case((jobs.c.status == JobStatus.COMPLETED.value, 1), else_=0)).label(
                        "completed"
                    ),
                    func.sum(
                        case(
                            (jobs.c.status == JobStatus.COMPLETED.value, jobs.c.num_images), else_=0
                        )
                    ).label("images"),
                    func.sum(case((jobs.c.status.in_(ACTIVE), jobs.c.price), else_=0)).label(
                        "reserved"
                    ),
                    func.max(jobs.c.created_at).label("last_request_at"),
                )
                .where(jobs.c.account_id.in_(ids))
                .group_by(jobs.c.account_id)
            ).all()
        }
        money: dict[tuple[str, str], int] = {
            (r.account_id, r.kind): int(r.total)
            for r in conn.execute(
                select(
                    ledger_table.c.account_id,
                    ledger_table.c.kind,
                    func.sum(ledger_table.c.amount).label("total"),
                )
                .where(
                    ledger_table.c.account_id.in_(ids),
                    ledger_table.c.kind.in_(("grant", "deduct", "capture")),
                )
                .group_by(ledger_table.c.account_id, ledger_table.c.kind)
            ).all()
        }
        key_rows: dict[str, list[KeyRow]] = {}
        for k in conn.execute(
            select(api_keys)
            .where(api_keys.c.account_id.in_(ids))
            .order_by(api_keys.c.created_at, api_keys.c.id)
        ).all():
            key_rows.setdefault(k.account_id, []).append(
                KeyRow(k.id, k.name, float(k.created_at), k.revoked_at)
            )
    return AccountsPage(
        accounts=[_account(r, job_usage.get(r.id), money, key_rows.get(r.id, [])) for r in rows],
        total=total,
    )


def _account(
    row: Any, usage: Any, money: dict[tuple[str, str], int], key_rows: list[KeyRow]
) -> AccountRow:
    return AccountRow(
        account_id=row.id,
        name=row.name,
        is_admin=bool(row.is_admin),
        balance=int(row.balance),
        reserved=int(usage.reserved or 0) if usage else 0,
        active_jobs=int(row.active_jobs),
        created_at=float(row.created_at),
        usage=Usage(
            requests=int(usage.requests) if usage else 0,
            completed=int(usage.completed or 0) if usage else 0,
            images=int(usage.images or 0) if usage else 0,
            spent=money.get((row.id, "capture"), 0),
            granted=money.get((row.id, "grant"), 0),
            deducted=money.get((row.id, "deduct"), 0),
            last_request_at=float(usage.last_request_at) if usage else None,
        ),
        keys=key_rows,
    )


def recent_jobs(
    db: Store,
    *,
    limit: int = 50,
    before: str | None = None,
    status: JobStatus | None = None,
    account_id: str | None = None,
) -> JobsPage:
    """Jobs of every account, newest first. Job ids are UUIDv7 (time-ordered), so the
    primary key orders them and `before` (a job id) pages back without another index."""
    if not 1 <= limit <= MAX_JOBS:
        raise ValueError(f"limit must be from 1 to {MAX_JOBS}")
    query = select(jobs, accounts.c.name.label("account_name")).join(
        accounts, accounts.c.id == jobs.c.account_id
    )
    if status is not None:
        query = query.where(jobs.c.status == status.value)
    if account_id is not None:
        query = query.where(jobs.c.account_id == account_id)
    if before is not None:
        query = query.where(jobs.c.id < before)
    query = query.order_by(jobs.c.id.desc()).limit(limit + 1)
    with db.read() as conn:
        rows = conn.execute(query).all()
    found = [JobRow(Job.from_row(r), r.account_name) for r in rows[:limit]]
    more = len(rows) > limit
    return JobsPage(jobs=found, next_before=found[-1].job.id if more and found else None)


def adjust_credits(
    db: Store,
    account_id: str,
    kind: Literal["grant", "deduct"],
    amount: int,
    *,
    reason: str,
    actor_key_id: str,
) -> Adjustment:
    """Grant or deduct `amount` credits, recorded as one ledger entry with the admin key's id
    and the reason. Raises LookupError (no account) or DeductExceedsBalance."""
    with db.write() as conn:
        if kind == "grant":
            balance = ledger.grant_in(conn, account_id, amount, reason, actor_key_id=actor_key_id)
        else:
            balance = ledger.deduct_in(conn, account_id, amount, reason, actor_key_id=actor_key_id)
    return Adjustment(account_id, kind, amount, balance)
