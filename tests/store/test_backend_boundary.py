"""No module outside `auraserve.store` branches on the store's backend: what differs between
SQLite and PostgreSQL lives in one driver module each (`store.drivers`), and anything else
asks the driver a backend-neutral question (`local_file`, `hears_every_commit`, ...). The
imports of the database drivers are import-linter's to refuse (pyproject.toml); this scans
the code for the branches: a backend's name in a string, an `is_sqlite`, a `dialect.name`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import auraserve

SRC = Path(auraserve.__file__).parent
STORE = SRC / "store"
# A string that names a backend (a URL scheme, a dialect name), compared or matched on.
_BACKEND_STRING = re.compile(r"^(sqlite|postgres(ql)?)(\b|:|\+|$)", re.IGNORECASE)
_BACKEND_NAMES = {"sqlite3", "psycopg", "psycopg_pool", "is_sqlite", "is_postgresql"}


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes: prose may name a backend."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def backend_branches(source: str) -> list[str]:
    """What in `source` looks at the backend, as `line: what`."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and _BACKEND_STRING.match(node.value.strip()):
                what = f"the string {node.value!r}"
        elif isinstance(node, ast.Attribute):
            if node.attr in _BACKEND_NAMES:
                what = f".{node.attr}"
            elif node.attr == "name" and getattr(node.value, "attr", None) == "dialect":
                what = ".dialect.name"
        elif isinstance(node, ast.Name) and node.id in _BACKEND_NAMES:
            what = node.id
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            hits = [
                n for n in names if n.split(".")[0] in _BACKEND_NAMES or "sqlalchemy.dialects" in n
            ]
            if hits:
                what = f"import {hits[0]}"
        if what is not None:
            found.append(f"{getattr(node, 'lineno', '?')}: {what}")
    return found


def test_nothing_outside_the_store_branches_on_the_backend() -> None:
    offences = {
        str(path.relative_to(SRC)): hits
        for path in sorted(SRC.rglob("*.py"))
        if STORE not in path.parents
        for hits in [backend_branches(path.read_text())]
        if hits
    }
    assert offences == {}


def test_the_scan_finds_each_kind_of_branch() -> None:
    """The scan can fail: each way of branching that it refuses is found."""
    assert backend_branches('if url.startswith("sqlite"):\n    pass\n')
    assert backend_branches('if url.startswith(("postgresql://", "x")):\n    pass\n')
    assert backend_branches("if db.is_sqlite:\n    pass\n")
    assert backend_branches('if conn.dialect.name == "x":\n    pass\n')
    assert backend_branches("import sqlite3\n")
    assert backend_branches("from sqlalchemy.dialects.postgresql import insert\n")
    assert backend_branches("from psycopg_pool import AsyncConnectionPool\n")
    # Prose may name them; other strings that merely contain the word are not branches.
    assert not backend_branches('"""Works on SQLite and PostgreSQL."""\nx = 1\n')
    assert not backend_branches('label = "the sqlite-like store"\n')
