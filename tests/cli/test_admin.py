"""The admin commands' output: aligned tables with a header for people, the same rows as JSON."""

from __future__ import annotations

import json

from auraserve.config import Settings
from auraserve.runtime import Runtime
from auraserve.store import keys
from tests.cli.test_cli import run_cli
from tests.store_jobs import submit_job


def _columns(header: str, line: str) -> dict[str, str]:
    """Cells of `line` by the header's column starts (the table is aligned, names have no
    blanks in these tests)."""
    names = header.split()
    starts = [header.index(name) for name in names]
    ends = [*starts[1:], None]
    return {n: line[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}


def test_keys_list_is_a_table_with_balance_and_reserved(
    settings: Settings, runtime: Runtime
) -> None:
    rich = keys.create_account(runtime.db, "rich", credits=1000)
    spare = keys.create_key(runtime.db, rich.account_id, "spare")
    poor = keys.create_account(runtime.db, "poor", credits=7)
    # A queued job holds its price as reserved credits until it ends.
    submit_job(runtime.db, rich.account_id, {"prompt": "x", "steps": 2}, model="auraflow-v0-3-512")
    keys.revoke_key(runtime.db, poor.key_id)

    listed = run_cli("keys", "list", settings=settings)
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    assert header.split() == ["KEY", "ID", "ACCOUNT", "NAME", "STATE", "CREATED", "BALANCE",
                              "RESERVED"]  # fmt: skip
    assert len(lines) == 3
    # Aligned: every row's cells start where the header's do (numbers end where theirs end).
    header = header.replace("KEY ID", "KEY_ID")
    rows = {_columns(header, line)["KEY_ID"]: _columns(header, line) for line in lines}
    assert all(len(line) <= len(header) for line in lines)
    reserved = int(rows[rich.key_id]["RESERVED"])
    assert reserved > 0
    assert int(rows[rich.key_id]["BALANCE"]) == 1000 - reserved
    assert rows[spare.key_id]["BALANCE"] == rows[rich.key_id]["BALANCE"]  # one account
    assert rows[poor.key_id]["STATE"] == "revoked" and rows[poor.key_id]["BALANCE"] == "7"

    as_json = run_cli("keys", "list", "--json", settings=settings)
    records = {r["key_id"]: r for r in json.loads(as_json.stdout)}
    assert set(records) == set(rows)
    assert records[rich.key_id]["reserved"] == reserved
    assert records[rich.key_id]["balance"] == 1000 - reserved
    assert records[poor.key_id]["state"] == "revoked" and records[poor.key_id]["revoked_at"]
    assert records[spare.key_id]["name"] == "spare"
    assert records[rich.key_id]["created_at"] == rows[rich.key_id]["CREATED"]


def test_an_empty_store_lists_a_header_and_says_how_to_start(
    settings: Settings, runtime: Runtime
) -> None:
    listed = run_cli("keys", "list", settings=settings)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["KEY", "ID", "ACCOUNT", "NAME", "STATE", "CREATED",
                                     "BALANCE", "RESERVED"]  # fmt: skip
    assert "auraserve keys create" in listed.stderr
    assert json.loads(run_cli("keys", "list", "--json", settings=settings).stdout) == []


def test_text_by_default_json_when_asked(settings: Settings, runtime: Runtime) -> None:
    made = keys.create_account(runtime.db, "t", credits=3)
    revoked = run_cli("keys", "revoke", made.key_id, "--json", settings=settings)
    assert json.loads(revoked.stdout) == {"key_id": made.key_id, "revoked": True}
    created = run_cli("keys", "create", "--name", "n", "--credits", "9", settings=settings)
    assert created.returncode == 0, created.stderr
    text = created.stdout
    assert "API key (shown once):" in text and "credits:" in text and "{" not in text
    upgraded = run_cli("db", "upgrade", "--json", settings=settings)
    assert json.loads(upgraded.stdout)["revision"]
    workers = run_cli("workers", settings=settings)
    assert workers.stdout.split()[:3] == ["ID", "HOST", "PID"]
