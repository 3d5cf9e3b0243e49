"""Accounts, API keys and webhook signing secrets.

A key looks like `aura_<key id>_<secret>`: the key id (public, 16 hex chars) finds the row,
the secret is 32 random bytes (base64url). Only SHA-256 of the whole key is stored, compared in
constant time; the key itself is shown once, at creation.

Webhook secrets are not stored: an account row holds a version, and the secret is derived from
the server key (`credentials.ServerKey`) the `Store` was opened with. A rotation bumps the
version and keeps the previous secret signing beside the new one until its grace period ends
(Standard Webhooks receivers accept any one signature).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from auraserve.core.credentials import KEY_PREFIX, ServerKey, new_api_key
from auraserve.core.ids import short_id
from auraserve.store import ledger
from auraserve.store.db import Store
from auraserve.store.schema import accounts, api_keys


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    max_queued: int | None
    requests_per_minute: int | None
    max_concurrent: int | None
    # Operators' accounts: their keys also read deployment state (GET /v2/workers).
    is_admin: bool = False


@dataclass(frozen=True)
class CreatedKey:
    key: str
    key_id: str
    account_id: str
    credits: int
    webhook_secret: str
    name: str


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    account_id: str
    name: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class Rotation:
    account_id: str
    secret: str
    version: int
    previous_secret: str
    previous_until: float


DEFAULT_ROTATION_GRACE = 24 * 3600.0
"""How long a rotated-out webhook secret keeps signing: a day, as Svix does."""


def _hash(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def create_account(db: Store, name: str, credits: int = 0, *, is_admin: bool = False) -> CreatedKey:
    """A new account with one key and `credits` granted (`is_admin`: an operator's account,
    whose keys may also read deployment state). Returns the key (shown once)."""
    account_id = short_id("acct")
    key_id, raw = new_api_key()
    secret = db.server_key.webhook_secret(account_id, 1)
    now = time.time()
    with db.write() as conn:
        conn.execute(
            insert(accounts).values(
                id=account_id,
                name=name,
                balance=0,
                webhook_secret_version=1,
                is_admin=is_admin,
                created_at=now,
            )
        )
        _insert_key(conn, key_id, account_id, name, raw)
        if credits:
            ledger.grant_in(conn, account_id, credits, note="initial credits")
    return CreatedKey(raw, key_id, account_id, credits, secret, name)


def create_key(db: Store, account_id: str, name: str) -> CreatedKey:
    """Another key for an existing account."""
    key_id, raw = new_api_key()
    with db.write() as conn:
        row = conn.execute(
            select(accounts.c.webhook_secret_version).where(accounts.c.id == account_id)
        ).first()
        if row is None:
            raise LookupError(f"no account {account_id}")
        _insert_key(conn, key_id, account_id, name, raw)
        balance = ledger.balance_in(conn, account_id)
    secret = db.server_key.webhook_secret(account_id, row.webhook_secret_version)
    return CreatedKey(raw, key_id, account_id, balance, secret, name)


def _insert_key(conn: Connection, key_id: str, account_id: str, name: str, raw: str) -> None:
    conn.execute(
        insert(api_keys).values(
            id=key_id, account_id=account_id, name=name, key_hash=_hash(raw), created_at=time.time()
        )
    )


def list_keys(db: Store) -> list[KeyInfo]:
    with db.read() as conn:
        rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
    return [_key_info(r) for r in rows]


def get_key(db: Store, key_id: str) -> KeyInfo | None:
    with db.read() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
    return None if row is None else _key_info(row)


def _key_info(r: Any) -> KeyInfo:
    return KeyInfo(r.id, r.account_id, r.name, r.created_at, r.revoked_at)


def revoke_key(db: Store, key_id: str) -> bool:
    with db.write() as conn:
        result = conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=time.time())
        )
    # Forget every cached key, not just this one: the cache is keyed by the key's hash,
    # which the key id alone does not give us.
    db.auth_cache.clear()
    return result.rowcount == 1


def count_keys(db: Store) -> int:
    with db.read() as conn:
        return len(conn.execute(select(api_keys.c.id).limit(1)).all())


_KEY_LOOKUP = (
    select(
        api_keys.c.key_hash,
        api_keys.c.revoked_at,
        accounts.c.id,
        accounts.c.name,
        accounts.c.max_queued,
        accounts.c.requests_per_minute,
        accounts.c.max_concurrent,
        accounts.c.is_admin,
    )
    .join(accounts, accounts.c.id == api_keys.c.account_id)
    .where(api_keys.c.id == bindparam("key_id"))
)


def cached_account(db: Store, raw_key: str) -> Account | None:
    """The account of a key verified within `AUTH_CACHE_TTL`, without touching the database
    (so async callers can ask on their event loop); None means "ask `authenticate`"."""
    return db.auth_cache.get(_hash(raw_key))


def stale_account(db: Store, raw_key: str) -> Account | None:
    """`cached_account`, or the account of a key verified a little longer ago (within
    `store.db.AUTH_CACHE_GRACE` more): only to answer a read with while `lookup` renews it."""
    return db.auth_cache.get_stale(_hash(raw_key))


@dataclass(frozen=True)
class Verified:
    """A key's account as the database had it at `started` (monotonic, taken before the
    read), None when the key is malformed, unknown or revoked."""

    account: Account | None
    started: float


def lookup(db: Store, raw_key: str) -> Verified:
    """Ask the database (never the cache) and remember the answer in `db.auth_cache`, aged from
    the moment the read began: a lookup that waited for a pool thread or a connection is not
    trusted for longer than one that ran at once."""
    digest = _hash(raw_key)
    started = time.monotonic()
    account = _authenticate_uncached(db, raw_key, digest)
    if account is not None:
        db.auth_cache.put(digest, account, at=started)
    else:
        db.auth_cache.discard(digest)  # revoked elsewhere: no stale answer either
    return Verified(account, started)


def authenticate(db: Store, raw_key: str) -> Account | None:
    """The account a presented key belongs to, or None for malformed, unknown or revoked keys.

    A verified key is remembered for `store.db.AUTH_CACHE_TTL` seconds in `db.auth_cache`."""
    account = db.auth_cache.get(_hash(raw_key))
    if account is not None:
        return account
    return lookup(db, raw_key).account


def _authenticate_uncached(db: Store, raw_key: str, digest: str) -> Account | None:
    parts = raw_key.split("_")
    if len(parts) < 3 or parts[0] != KEY_PREFIX or len(raw_key) > 200:
        return None
    key_id = parts[1]
    with db.read() as conn:
        row = conn.execute(_KEY_LOOKUP, {"key_id": key_id}).first()
    # Compare even when the row is missing so timing does not reveal which key ids exist.
    expected = row.key_hash if row is not None else "0" * 64
    if not hmac.compare_digest(expected, digest) or row is None or row.revoked_at is not None:
        return None
    limits = (row.max_queued, row.requests_per_minute, row.max_concurrent)
    return Account(row.id, row.name, *limits, is_admin=bool(row.is_admin))


def webhook_secret(db: Store, account_id: str) -> str:
    """The account's current webhook secret (the newest, after a rotation); LookupError for
    no such account."""
    return webhook_secrets(db, account_id)[0]


def signing_secrets(
    key: ServerKey,
    account_id: str,
    version: int,
    previous_version: int | None,
    previous_until: float | None,
    now: float,
) -> tuple[str, ...]:
    """The secrets a delivery is signed with, from an account row's columns: the current
    one, and the previous one while its grace period lasts."""
    current = key.webhook_secret(account_id, version)
    if previous_version is None or previous_until is None or previous_until <= now:
        return (current,)
    return (current, key.webhook_secret(account_id, previous_version))


def webhook_secrets(db: Store, account_id: str, now: float | None = None) -> Sequence[str]:
    """Every secret that signs the account's deliveries now (two during a rotation)."""
    with db.read() as conn:
        row = conn.execute(
            select(
                accounts.c.webhook_secret_version,
                accounts.c.webhook_previous_version,
                accounts.c.webhook_previous_until,
            ).where(accounts.c.id == account_id)
        ).first()
    if row is None:
        raise LookupError(f"no account {account_id}")
    return signing_secrets(
        db.server_key,
        account_id,
        row.webhook_secret_version,
        row.webhook_previous_version,
        row.webhook_previous_until,
        time.time() if now is None else now,
    )


def rotate_webhook_secret(
    db: Store, account_id: str, grace_seconds: float = DEFAULT_ROTATION_GRACE
) -> Rotation:
    """A new webhook secret for the account; the current one keeps signing beside it for
    `grace_seconds`. A second rotation within the grace period retires the oldest at once.

    Raises:
        LookupError: no such account.
        ValueError: a negative grace period.
    """
    if grace_seconds < 0:
        raise ValueError("the grace period cannot be negative")
    until = time.time() + grace_seconds
    with db.write() as conn:
        # One guarded UPDATE: two rotations at once each move one version on, never both to
        # the same one.
        row = conn.execute(
            update(accounts)
            .where(accounts.c.id == account_id)
            .values(
                webhook_previous_version=accounts.c.webhook_secret_version,
                webhook_secret_version=accounts.c.webhook_secret_version + 1,
                webhook_previous_until=until,
            )
            .returning(accounts.c.webhook_secret_version)
        ).first()
    if row is None:
        raise LookupError(f"no account {account_id}")
    key = db.server_key
    version = row.webhook_secret_version
    return Rotation(
        account_id=account_id,
        secret=key.webhook_secret(account_id, version),
        version=version,
        previous_secret=key.webhook_secret(account_id, version - 1),
        previous_until=until,
    )
