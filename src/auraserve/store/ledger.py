"""Credits: integer units, an append-only ledger, and a cached available balance.

`accounts.balance` is the spendable balance and the ledger is the history that explains it:
grant (+), reserve (−, at submit), release (+, when a job ends unfinished) and capture (0: the
reserved credits are spent). The `*_in` functions run inside a caller's transaction so that a
reservation commits together with its job, and a settlement together with the job's final
status. The balance is decremented with a guarded UPDATE, which the database serialises per
row, so concurrent submits can never take it below zero.
"""

from __future__ import annotations

import time

from sqlalchemy import Connection, insert, select, update

from auraserve.errors import InsufficientBalance
from auraserve.store.db import Database
from auraserve.store.schema import accounts, ledger


def grant_in(conn: Connection, account_id: str, amount: int, note: str | None = None) -> int:
    if amount <= 0:
        raise ValueError("a grant must be positive")
    row = conn.execute(
        update(accounts)
        .where(accounts.c.id == account_id)
        .values(balance=accounts.c.balance + amount)
        .returning(accounts.c.balance)
    ).first()
    if row is None:
        raise LookupError(f"no account {account_id}")
    conn.execute(
        insert(ledger).values(
            account_id=account_id,
            kind="grant",
            amount=amount,
            balance_delta=amount,
            created_at=time.time(),
            note=note,
        )
    )
    return int(row.balance)


def reserve_in(conn: Connection, account_id: str, job_id: str, amount: int) -> int:
    """Take `amount` from the balance for `job_id`; raises InsufficientBalance. Returns the
    balance left."""
    row = conn.execute(
        update(accounts)
        .where(accounts.c.id == account_id, accounts.c.balance >= amount)
        .values(balance=accounts.c.balance - amount)
        .returning(accounts.c.balance)
    ).first()
    if row is None:
        raise InsufficientBalance()
    conn.execute(
        insert(ledger).values(
            account_id=account_id,
            job_id=job_id,
            kind="reserve",
            amount=amount,
            balance_delta=-amount,
            created_at=time.time(),
        )
    )
    return int(row.balance)


def capture_in(conn: Connection, account_id: str, job_id: str, amount: int) -> None:
    """The job completed: its reservation is spent. The unique index refuses a second one."""
    conn.execute(
        insert(ledger).values(
            account_id=account_id,
            job_id=job_id,
            kind="capture",
            amount=amount,
            balance_delta=0,
            created_at=time.time(),
        )
    )


def release_in(conn: Connection, account_id: str, job_id: str, amount: int) -> None:
    """The job ended without a result: give its reservation back."""
    conn.execute(
        update(accounts)
        .where(accounts.c.id == account_id)
        .values(balance=accounts.c.balance + amount)
    )
    conn.execute(
        insert(ledger).values(
            account_id=account_id,
            job_id=job_id,
            kind="release",
            amount=amount,
            balance_delta=amount,
            created_at=time.time(),
        )
    )


def balance_in(conn: Connection, account_id: str) -> int:
    value = conn.execute(
        select(accounts.c.balance).where(accounts.c.id == account_id)
    ).scalar_one_or_none()
    if value is None:
        raise LookupError(f"no account {account_id}")
    return int(value)


def grant(db: Database, account_id: str, amount: int, note: str | None = None) -> int:
    with db.write() as conn:
        return grant_in(conn, account_id, amount, note)


def balance(db: Database, account_id: str) -> int:
    with db.read() as conn:
        return balance_in(conn, account_id)


def entries(db: Database, account_id: str) -> list[dict[str, object]]:
    with db.read() as conn:
        rows = conn.execute(
            select(ledger).where(ledger.c.account_id == account_id).order_by(ledger.c.id)
        ).all()
    return [dict(r._mapping) for r in rows]
