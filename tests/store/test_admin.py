"""The operator's store functions on the real backend (SQLite, or PostgreSQL with
AURASERVE_TEST_BACKEND=postgresql): deducts racing each other and the submits never take a
balance below zero, and every change is one ledger entry that adds up."""

from __future__ import annotations

import threading

import pytest

from auraserve.errors import DeductExceedsBalance, InsufficientBalance
from auraserve.store import admin, keys, ledger
from auraserve.store.db import Store


def test_concurrent_deducts_take_all_or_nothing(db: Store) -> None:
    account = keys.create_account(db, "target", credits=55).account_id
    results: list[int | str] = []
    start = threading.Barrier(8)

    def deduct() -> None:
        start.wait()
        try:
            change = admin.adjust_credits(
                db, account, "deduct", 10, reason="race", actor_key_id="k" * 16
            )
            results.append(change.balance)
        except DeductExceedsBalance:
            results.append("refused")

    threads = [threading.Thread(target=deduct) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("refused") == 3
    assert sorted(r for r in results if r != "refused") == [5, 15, 25, 35, 45]
    assert ledger.balance(db, account) == 5
    entries = ledger.entries(db, account)
    assert sum(int(str(e["balance_delta"])) for e in entries) == 5  # the ledger explains it
    assert [e["kind"] for e in entries].count("deduct") == 5


def test_a_deduct_racing_reservations_never_overdraws(db: Store) -> None:
    account = keys.create_account(db, "busy", credits=100).account_id
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def reserve() -> None:
        start.wait()
        try:
            with db.write() as conn:  # rolled back when refused
                ledger.reserve_many_in(conn, account, [("0" * 35 + "1", 70)], max_active=10)
            outcomes.append("reserved")
        except InsufficientBalance:
            outcomes.append("reserve refused")

    def deduct() -> None:
        start.wait()
        try:
            admin.adjust_credits(db, account, "deduct", 70, reason="r", actor_key_id="a" * 16)
            outcomes.append("deducted")
        except DeductExceedsBalance:
            outcomes.append("deduct refused")

    threads = [threading.Thread(target=reserve), threading.Thread(target=deduct)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) in (
        ["deduct refused", "reserved"],
        ["deducted", "reserve refused"],
    )
    assert ledger.balance(db, account) == 30


def test_grant_and_deduct_refuse_what_is_not_a_positive_amount(db: Store) -> None:
    account = keys.create_account(db, "x", credits=5).account_id
    for amount in (0, -1):
        with pytest.raises(ValueError, match="must be positive"), db.write() as conn:
            ledger.deduct_in(conn, account, amount)
    with pytest.raises(LookupError):
        admin.adjust_credits(db, "acct_none", "grant", 1, reason="r", actor_key_id="a")
    with pytest.raises(LookupError):
        admin.adjust_credits(db, "acct_none", "deduct", 1, reason="r", actor_key_id="a")
    assert ledger.balance(db, account) == 5


def test_accounts_page_counts_only_its_accounts_usage(db: Store) -> None:
    first = keys.create_account(db, "first", credits=10)
    keys.create_account(db, "second", credits=20, is_admin=True)
    keys.revoke_key(db, first.key_id)
    page = admin.list_accounts(db, limit=10)
    assert page.total == 2
    second, one = page.accounts
    assert second.name == "second" and second.is_admin and second.usage.granted == 20
    assert one.keys[0].revoked_at is not None and one.usage.requests == 0
    with pytest.raises(ValueError, match="limit must be"):
        admin.list_accounts(db, limit=0)
