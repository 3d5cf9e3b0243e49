"""The admin commands: keys, credits, workers, db. They never load the model stack."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from auraserve.cli.stores import open_admin, store_label


def refuse(message: str) -> int:
    print(f"auraserve: {message}", file=sys.stderr)
    return 2


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
    # Only a new account makes sense on a new store; everything else needs existing rows.
    may_create = args.keys_cmd == "create" and not args.account
    runtime = open_admin(args, may_create=may_create)
    try:
        if args.keys_cmd == "create":
            if args.account:
                try:
                    created = keys.create_key(runtime.db, args.account, args.name)
                except LookupError:
                    return refuse(f"--account {args.account}: no such account in this store")
            else:
                created = keys.create_account(
                    runtime.db, args.name, credits=args.credits or 0, is_admin=args.admin
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
                print(f"API key (shown once): {created.key}")
                print(
                    f"key id {created.key_id}, account {created.account_id}, "
                    f"credits {created.credits}"
                )
                print(f"webhook signing secret: {created.webhook_secret}")
                if args.admin:
                    print("admin account: its keys may also read GET /v2/workers")
        elif args.keys_cmd == "list":
            rows = keys.list_keys(runtime.db)
            if args.json:
                print(json.dumps([r.__dict__ for r in rows]))
            for r in rows if not args.json else []:
                state = "revoked" if r.revoked_at else "active"
                print(f"{r.key_id}\t{r.account_id}\t{state}\t{r.name}")
        elif args.keys_cmd == "revoke":
            if not keys.revoke_key(runtime.db, args.key_id):
                print(f"no active key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
        elif args.keys_cmd == "webhook-secret":
            try:
                current = keys.webhook_secrets(runtime.db, args.account)
            except LookupError:
                return refuse(f"{args.account}: no such account in this store")
            if args.json:
                print(json.dumps({"account_id": args.account, "webhook_secrets": list(current)}))
            else:
                print("\n".join(current))
        elif args.keys_cmd == "rotate-webhook-secret":
            try:
                rotation = keys.rotate_webhook_secret(
                    runtime.db, args.account, grace_seconds=args.grace_hours * 3600
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
        runtime.close()
    return 0


def cmd_credits(args: argparse.Namespace) -> int:
    from auraserve.store import ledger

    runtime = open_admin(args, may_create=False)
    try:
        if args.credits_cmd == "grant":
            try:
                balance = ledger.grant(runtime.db, args.account_id, args.amount, note="cli grant")
            except LookupError:
                return refuse(f"no account {args.account_id} in this store")
        else:
            try:
                balance = ledger.balance(runtime.db, args.account_id)
            except LookupError:
                # Status 1, not 2: the question was well formed and the answer is "none".
                print(f"no account {args.account_id}", file=sys.stderr)
                return 1
        print(json.dumps({"account_id": args.account_id, "credits": balance}))
    finally:
        runtime.close()
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    import time

    from auraserve.store import workers as registry

    runtime = open_admin(args, may_create=False)
    try:
        stale = runtime.settings.worker_stale_seconds
        now = time.time()
        rows = [
            w
            for w in registry.list_workers(runtime.db)
            if args.all or w.stopped_at is None or now - w.stopped_at < _RECENTLY_STOPPED
        ]
        if args.json:
            print(json.dumps(registry.report(rows, stale_seconds=stale, now=now)))
            return 0
        if not rows:
            print("no workers have registered with this store", file=sys.stderr)
            return 0
        table = [("ID", "HOST", "PID", "STATE", "LIVENESS", "SEEN", "JOBS", "MODELS", "DEVICE")]
        for w in rows:
            table.append(
                (
                    w.id,
                    w.host,
                    str(w.pid),
                    w.state,
                    w.liveness(stale, now),
                    f"{max(0.0, now - w.last_seen_at):.0f}s ago",
                    str(w.jobs_done),
                    ",".join(w.models),
                    w.device,
                )
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
        for row in table:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            print("  ".join([*cells, row[-1]]))
        print(
            f"live: heard from within {stale:g} s (AURASERVE_WORKER_STALE_SECONDS); "
            "stale: not heard from since (crashed or cut off); its leased jobs are requeued "
            "by any serving process once their lease expires",
            file=sys.stderr,
        )
    finally:
        runtime.close()
    return 0


# `auraserve workers` hides workers that stopped longer ago than this (--all shows them).
_RECENTLY_STOPPED = 3600.0


def cmd_db(args: argparse.Namespace) -> int:
    runtime = open_admin(args, may_create=True)  # opening migrates
    print(f"store at head revision ({store_label(runtime.settings)})")
    runtime.close()
    return 0
