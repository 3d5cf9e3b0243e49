"""Idempotency keys: one submit per (account, key), remembered for a while.

The key row is inserted in the same transaction as the job it names, so either both exist or
neither does. The primary key (account_id, key) is what makes concurrent duplicates safe: a
second transaction inserting the same key blocks on the first one's uncommitted row
(PostgreSQL) or runs after it (SQLite's single writer), then fails with IntegrityError; its
caller re-reads the row and answers with the first submit's job instead of making another.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, delete, insert, select, update

from auraserve.store.schema import idempotency_keys

_T = idempotency_keys.c


@dataclass(frozen=True)
class StoredKey:
    key: str
    request_hash: str
    job_id: str | None
    status_code: int | None
    response: dict[str, Any] | None
    created_at: float


def lookup_in(conn: Connection, account_id: str, key: str, *, ttl: float) -> StoredKey | None:
    """The live (younger than `ttl`) record of `key`, or None."""
    row = conn.execute(
        select(idempotency_keys).where(
            _T.account_id == account_id,
            _T.key == key,
            _T.created_at >= time.time() - ttl,
        )
    ).first()
    if row is None:
        return None
    return StoredKey(
        key=row.key,
        request_hash=row.request_hash,
        job_id=row.job_id,
        status_code=row.status_code,
        response=json.loads(row.response) if row.response else None,
        created_at=row.created_at,
    )


def claim_in(conn: Connection, account_id: str, key: str, request_hash: str, *, ttl: float) -> None:
    """Insert the key in `conn`'s transaction; raises IntegrityError if a live one exists.

    Expired keys of this account are deleted first (so an old key can be reused and the table
    stays bounded without a sweeper); the delete only touches this account's rows, which the
    primary key's leading column finds directly.
    """
    now = time.time()
    conn.execute(
        delete(idempotency_keys).where(_T.account_id == account_id, _T.created_at < now - ttl)
    )
    conn.execute(
        insert(idempotency_keys).values(
            account_id=account_id, key=key, request_hash=request_hash, created_at=now
        )
    )


def attach_in(
    conn: Connection,
    account_id: str,
    key: str,
    *,
    job_id: str,
    status_code: int | None = None,
    response: dict[str, Any] | None = None,
) -> None:
    """Record what the key produced (same transaction as `claim_in`, so never seen empty)."""
    conn.execute(
        update(idempotency_keys)
        .where(and_(_T.account_id == account_id, _T.key == key))
        .values(
            job_id=job_id,
            status_code=status_code,
            response=json.dumps(response) if response is not None else None,
        )
    )
