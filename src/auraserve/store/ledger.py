"""Credits: integer units, an append-only ledger, and a cached available balance.

`accounts.balance` is the spendable balance and the ledger is the history that explains it:
grant (+), deduct (−, an operator takes credits back), reserve (−, at submit), release (+, when
a job ends unfinished) and capture (0: the reserved credits are spent). The `*_in` functions run
inside a caller's transaction so that a reservation commits together with its job, and a
settlement together with the job's final status. The balance is decremented with a guarded
UPDATE, which the database serialises per row, so concurrent submits (and deducts) can never
take it below zero.
"""

from __future__ import annotations

import time
from typing import NoReturn

from sqlalchemy import Connection, bindparam, insert, select, update

from auraserve.errors import DeductExceedsBalance, InsufficientBalance, QueueLimitReached
from auraserve.store.db import Store
from auraserve.store.schema import accounts, ledger


def grant_in(
    conn: Connection,
    account_id: str,
    amount: int,
    note: str | None = None,
    *,
    actor_key_id: str | None = None,
) -> int:
    """Add `amount` (> 0) to the balance and record it; `actor_key_id`: the admin key that
    granted it over the API. Returns the new balance. Raises LookupError for no account."""
    balance = _adjust_in(conn, account_id, amount, "grant", note, actor_key_id)
    if balance is None:
        raise LookupError(f"no account {account_id}")
    return balance


def deduct_in(
    conn: Connection,
    account_id: str,
    amount: int,
    note: str | None = None,
    *,
    actor_key_id: str | None = None,
) -> int:
    """Take `amount` (> 0) from the balance and record it: all of it or nothing (the guarded
    UPDATE never takes the balance below zero, however it races submits). Returns the new
    balance. Raises LookupError (no account) or DeductExceedsBalance."""
    balance = _adjust_in(conn, account_id, amount, "deduct", note, actor_key_id)
    if balance is None:
        raise DeductExceedsBalance(amount, balance_in(conn, account_id))
    return balance


def _adjust_in(
    conn: Connection,
    account_id: str,
    amount: int,
    kind: str,
    note: str | None,
    actor_key_id: str | None,
) -> int | None:
    """Grant or deduct `amount` and append its ledger entry; None (nothing written) when
    there is no such account or a deduct is more than the balance."""
    if amount <= 0:
        raise ValueError(f"a {kind} must be positive")
    delta = amount if kind == "grant" else -amount
    guard = [accounts.c.id == account_id]
    if delta < 0:
        guard.append(accounts.c.balance >= amount)
    row = conn.execute(
        update(accounts)
        .where(*guard)
        .values(balance=accounts.c.balance + delta)
        .returning(accounts.c.balance)
    ).first()
    if row is None:
        return None
    conn.execute(
        insert(ledger).values(
            account_id=account_id,
            kind=kind,
            amount=amount,
            balance_delta=delta,
            created_at=time.time(),
            note=note,
            actor_key_id=actor_key_id,
        )
    )
    return int(row.balance)


# Statements built once: constructing SQLAlchemy statements per call cost more than running
# them (profiled: ~70% of a submit), so the hot paths bind parameters into prebuilt ones.
_INSERT_ENTRY = insert(ledger)
_RESERVE = (
    update(accounts)
    .where(
        accounts.c.id == bindparam("acct"),
        accounts.c.balance >= bindparam("amount"),
        accounts.c.active_jobs + bindparam("count") <= bindparam("max_active"),
    )
    .values(
        balance=accounts.c.balance - bindparam("amount"),
        active_jobs=accounts.c.active_jobs + bindparam("count"),
    )
    .returning(accounts.c.balance)
)
_ACCOUNT_STATE = select(accounts.c.balance, accounts.c.active_jobs).where(
    accounts.c.id == bindparam("acct")
)


def _entry(
    account_id: str, job_id: str | None, kind: str, amount: int, delta: int
) -> dict[str, object]:
    return {
        "account_id": account_id,
        "job_id": job_id,
        "kind": kind,
        "amount": amount,
        "balance_delta": delta,
        "created_at": time.time(),
        "note": None,
    }


def reserve_many_in(
    conn: Connection, account_id: str, reservations: list[tuple[str, int]], *, max_active: int
) -> int:
    """Take the credits and a queue slot (of the account's `max_active`) for each of
    `reservations`, `(job_id, amount)` each: one entry per job and one guarded UPDATE for all
    of them, which must all fit, else it raises QueueLimitReached or InsufficientBalance and
    the caller's transaction must roll back (nothing of it is written). Returns the balance
    left after the last.

    Call it last, right before COMMIT: its guarded UPDATE locks the account row until the
    transaction ends, and every other submit of the account waits for that lock (PostgreSQL),
    so each round trip made after it would be one that all of them wait for."""
    entries = [
        _entry(account_id, job_id, "reserve", amount, -amount) for job_id, amount in reservations
    ]
    conn.execute(_INSERT_ENTRY, entries)
    total = sum(amount for _, amount in reservations)
    guard = {"acct": account_id, "amount": total, "count": len(reservations)}
    row = conn.execute(_RESERVE, {**guard, "max_active": max_active}).first()
    if row is None:
        refuse(conn, account_id, len(reservations), max_active)
    return int(row.balance)


def refuse(conn: Connection, account_id: str, count: int, max_active: int) -> NoReturn:
    """Raise why a guarded reservation of `count` slots took nothing: the queue limit (then
    QueueLimitReached) or the money (InsufficientBalance)."""
    state = conn.execute(_ACCOUNT_STATE, {"acct": account_id}).first()
    if state is not None and state.active_jobs + count > max_active:
        raise QueueLimitReached(
            f"Too many requests in flight for this account ({state.active_jobs}, limit "
            f"{max_active}); wait for some to finish"
        )
    raise InsufficientBalance()


def capture_in(conn: Connection, account_id: str, job_id: str, amount: int) -> None:
    """The job completed: its reservation is spent. The unique index refuses a second one."""
    conn.execute(_INSERT_ENTRY, _entry(account_id, job_id, "capture", amount, 0))


def release_in(conn: Connection, account_id: str, job_id: str, amount: int) -> None:
    """The job ended without a result: give its reservation back."""
    conn.execute(
        update(accounts)
        .where(accounts.c.id == account_id)
        .values(balance=accounts.c.balance + amount)
    )
    conn.execute(_INSERT_ENTRY, _entry(account_id, job_id, "release", amount, amount))


def balance_in(conn: Connection, account_id: str) -> int:
    value = conn.execute(
        select(accounts.c.balance).where(accounts.c.id == account_id)
    ).scalar_one_or_none()
    if value is None:
        raise LookupError(f"no account {account_id}")
    return int(value)


def grant(db: Store, account_id: str, amount: int, note: str | None = None) -> int:
    with db.write() as conn:
        return grant_in(conn, account_id, amount, note)


def balance(db: Store, account_id: str) -> int:
    with db.read() as conn:
        return balance_in(conn, account_id)


def entries(db: Store, account_id: str) -> list[dict[str, object]]:
    with db.read() as conn:
        rows = conn.execute(
            select(ledger).where(ledger.c.account_id == account_id).order_by(ledger.c.id)
        ).all()
    return [dict(r._mapping) for r in rows]
