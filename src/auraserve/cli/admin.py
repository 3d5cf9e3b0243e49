"""The admin commands: keys, credits, workers, db. They never load the model stack."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from auraserve.cli.output import iso, print_fields, print_json, print_table, refuse
from auraserve.cli.stores import FIRST_START, NEEDS_ROWS, ON_REQUEST, open_admin, store_label

if TYPE_CHECKING:
    from auraserve.store.db import Store


def cmd_keys(args: argparse.Namespace) -> int:
    from auraserve.store import keys

    if args.keys_cmd == "create" and args.account and args.credits is not None:
        return refuse(
            "--credits is for a new account; give an existing account credits with "
            f"`auraserve credits grant {args.account} N`"
        )
    if args.keys_cmd == "create" and args.account and args.admin:
        return refuse(
            "--admin makes a new admin account; an existing account stays what it is "
            "(make an operator account with `auraserve keys create --name NAME --admin`)"
        )
    # Only a new account makes sense on a new store (with --create); the rest needs rows.
    new_account = args.keys_cmd == "create" and not args.account
    _, store = open_admin(args, ON_REQUEST if new_account else NEEDS_ROWS)
    try:
        if args.keys_cmd == "create":
            if args.account:
                try:
                    created = keys.create_key(store, args.account, args.name)
                except LookupError:
                    return refuse(f"--account {args.account}: no such account in this store")
            else:
                created = keys.create_account(
                    store, args.name, credits=args.credits or 0, is_admin=args.admin
                )
            record = {
                "key": created.key,
                "key_id": created.key_id,
                "account_id": created.account_id,
                "credits": created.credits,
                "webhook_secret": created.webhook_secret,
                "name": created.name,
            }
            if args.admin:
                record["admin"] = True
            if args.json:
                print(json.dumps(record))
            else:
                fields: dict[str, object] = {
                    "API key (shown once)": created.key,
                    "key id": created.key_id,
                    "account": created.account_id,
                    "credits": created.credits,
                    "webhook signing secret": created.webhook_secret,
                }
                if args.admin:
                    fields["admin"] = (
                        "yes: its keys reach /v2/admin/... (Admin tab) and GET /v2/workers"
                    )
                print_fields(fields)
        elif args.keys_cmd == "list":
            _list_keys(args, store)
        elif args.keys_cmd == "revoke":
            if not keys.revoke_key(store, args.key_id):
                print(f"no active key {args.key_id}", file=sys.stderr)
                return 1
            if args.json:
                print_json({"key_id": args.key_id, "revoked": True})
            else:
                print(f"revoked {args.key_id}")
        elif args.keys_cmd == "webhook-secret":
            try:
                current = keys.webhook_secrets(store, args.account)
            except LookupError:
                return refuse(f"{args.account}: no such account in this store")
            if args.json:
                print(json.dumps({"account_id": args.account, "webhook_secrets": list(current)}))
            else:
                print("\n".join(current))
        elif args.keys_cmd == "rotate-webhook-secret":
            try:
                rotation = keys.rotate_webhook_secret(
                    store, args.account, grace_seconds=args.grace_hours * 3600
                )
            except LookupError:
                return refuse(f"{args.account}: no such account in this store")
            until = datetime.fromtimestamp(rotation.previous_until, UTC).isoformat(
                timespec="seconds"
            )
            if args.json:
                print(
                    json.dumps(
                        {
                            "account_id": rotation.account_id,
                            "webhook_secret": rotation.secret,
                            "previous_webhook_secret": rotation.previous_secret,
                            "previous_signs_until": until,
                        }
                    )
                )
            else:
                print(f"new webhook signing secret: {rotation.secret}")
                print(f"the previous secret keeps signing beside it until {until}")
    finally:
        store.dispose()
    return 0


def cmd_credits(args: argparse.Namespace) -> int:
    from auraserve.store import history, ledger

    _, store = open_admin(args)
    try:
        if args.credits_cmd == "grant":
            try:
                ledger.grant(store, args.account_id, args.amount, note="cli grant")
            except LookupError:
                return refuse(f"no account {args.account_id} in this store")
        summary = history.account_summary(store, args.account_id, entries=0)
        if summary is None:
            # Status 1, not 2: the question was well formed and the answer is "none".
            print(f"no account {args.account_id}", file=sys.stderr)
            return 1
        record = {
            "account_id": summary.account_id,
            "name": summary.name,
            "credits": summary.balance,
            "reserved": summary.reserved,
        }
        if args.json:
            print_json(record)
        else:
            if args.credits_cmd == "grant":
                print(f"granted {args.amount} credits", file=sys.stderr)
            print_table(
                ("ACCOUNT", "NAME", "BALANCE", "RESERVED"),
                [(summary.account_id, summary.name, summary.balance, summary.reserved)],
            )
    finally:
        store.dispose()
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    import time

    from auraserve.store import workers as registry

    settings, store = open_admin(args)
    try:
        stale = settings.worker_stale_seconds
        now = time.time()
        rows = [
            w
            for w in registry.list_workers(store)
            if args.all or w.stopped_at is None or now - w.stopped_at < _RECENTLY_STOPPED
        ]
        if args.json:
            print(json.dumps(registry.report(rows, stale_seconds=stale, now=now)))
            return 0
        if not rows:
            print("no workers have registered with this store", file=sys.stderr)
        table: list[tuple[object, ...]] = [
            ("ID", "HOST", "PID", "STATE", "LIVENESS", "SEEN", "JOBS", "MODELS", "DEVICE")
        ]
        for w in rows:
            table.append(
                (
                    w.id,
                    w.host,
                    w.pid,
                    w.state,
                    w.liveness(stale, now),
                    f"{max(0.0, now - w.last_seen_at):.0f}s ago",
                    w.jobs_done,
                    ",".join(w.models),
                    w.device,
                )
            )
        print_table([str(c) for c in table[0]], table[1:])
        print(
            f"live: heard from within {stale:g} s (AURASERVE_WORKER_STALE_SECONDS); "
            "stale: not heard from since (crashed or cut off); its leased jobs are requeued "
            "by any serving process once their lease expires",
            file=sys.stderr,
        )
    finally:
        store.dispose()
    return 0


# `auraserve workers` hides workers that stopped longer ago than this (--all shows them).
_RECENTLY_STOPPED = 3600.0


def cmd_db(args: argparse.Namespace) -> int:
    from auraserve.store.migrations import HEAD_REVISION

    settings, store = open_admin(args, FIRST_START)  # opening migrates
    try:
        if args.json:
            print_json({"store": store_label(settings), "revision": HEAD_REVISION})
        else:
            print(f"store at head revision {HEAD_REVISION} ({store_label(settings)})")
    finally:
        store.dispose()
    return 0


def _list_keys(args: argparse.Namespace, store: Store) -> None:
    """Every key with its account's balance and reserved credits (never the key itself)."""
    from auraserve.store import history, keys

    summaries: dict[str, history.AccountSummary | None] = {}
    rows = []
    for info in keys.list_keys(store):
        if info.account_id not in summaries:
            summaries[info.account_id] = history.account_summary(store, info.account_id, entries=0)
        summary = summaries[info.account_id]
        rows.append(
            {
                "key_id": info.key_id,
                "account_id": info.account_id,
                "name": info.name,
                "state": "revoked" if info.revoked_at else "active",
                "created_at": iso(info.created_at),
                "revoked_at": iso(info.revoked_at),
                "balance": summary.balance if summary else 0,
                "reserved": summary.reserved if summary else 0,
            }
        )
    if args.json:
        print_json(rows)
        return
    columns = ("KEY ID", "ACCOUNT", "NAME", "STATE", "CREATED", "BALANCE", "RESERVED")
    fields = ("key_id", "account_id", "name", "state", "created_at", "balance", "reserved")
    print_table(columns, [[row[f] for f in fields] for row in rows])
    if not rows:
        print("no keys in this store yet: auraserve keys create --name NAME", file=sys.stderr)
