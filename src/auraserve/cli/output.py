"""How commands print: aligned tables with a header for people, JSON with `--json`."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Columns padded to their widest cell; numbers right-aligned, so they read as numbers.
    The last column is not padded (no trailing blanks)."""
    cells = [[str(c) for c in header], *[["" if c is None else str(c) for c in r] for r in rows]]
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) for r in rows) for i in range(len(header))
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        parts = []
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            if numeric[i]:
                parts.append(cell.rjust(widths[i]))
            else:
                parts.append(cell if last else cell.ljust(widths[i]))
        print("  ".join(parts).rstrip())


def print_json(value: Any) -> None:
    print(json.dumps(value))


def iso(timestamp: float | None) -> str | None:
    """UNIX seconds as an ISO 8601 UTC time, for tables and JSON alike."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def print_fields(record: Mapping[str, object]) -> None:
    """One `name: value` line per field, names aligned: a record for people."""
    width = max(len(name) for name in record)
    for name, value in record.items():
        print(f"{name + ':':<{width + 1}} {value}")


def refuse(message: str) -> int:
    """A request that cannot be done as given: one line on stderr, exit status 2."""
    print(f"auraserve: {message}", file=sys.stderr)
    return 2
