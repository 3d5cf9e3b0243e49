"""The store a command works on: where it is, whether it exists, opening it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from auraserve.cli.flags import settings_from
from auraserve.config import Settings
from auraserve.errors import ConfigError

if TYPE_CHECKING:
    from auraserve.engine.base import Engine
    from auraserve.runtime import Runtime


def store_label(settings: Settings) -> str:
    """Where the store is, for people: the SQLite file, or the PostgreSQL URL without password."""
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        return f"SQLite {url.split(':///', 1)[-1]}"
    from sqlalchemy.engine import make_url

    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    return f"PostgreSQL {shown}"


def store_exists(settings: Settings) -> bool:
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        return path not in ("", ":memory:") and Path(path).is_file()
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.pool import NullPool

    # Migrations record themselves in alembic_version: without it the database holds no store.
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return inspect(conn).has_table("alembic_version")
    finally:
        engine.dispose()


@contextmanager
def reaching_store(settings: Settings) -> Iterator[None]:
    """A store that cannot be reached (server down, no such database) is a setting to fix."""
    from sqlalchemy.exc import OperationalError

    try:
        yield
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise ConfigError(
            f"cannot open the store {store_label(settings)}: {reason} "
            "(check AURASERVE_DATABASE_URL)"
        ) from None


def open_runtime(settings: Settings, engine: Engine | None = None) -> Runtime:
    from auraserve.runtime import Runtime

    with reaching_store(settings):
        return Runtime.open(settings, engine=engine)


def open_admin(args: argparse.Namespace, *, may_create: bool) -> Runtime:
    """Open the configured store for an admin command and say on stderr which one it is.

    Without `may_create`, a store that does not exist is refused: the command was most likely
    run from another directory than the server, and an empty new store would hand out keys
    and credits that the server never sees."""
    settings = settings_from(args)
    label = store_label(settings)
    with reaching_store(settings):
        exists = store_exists(settings)
    if not exists and not may_create:
        raise ConfigError(
            f"no store at {label}: run this where the server runs, or point --data-dir "
            "(AURASERVE_DATA_DIR) or AURASERVE_DATABASE_URL at the server's store"
        )
    runtime = open_runtime(settings)
    note = "" if exists else " (new and empty: created by this command)"
    print(f"store: {label}{note}{_new_server_key(runtime)}", file=sys.stderr, flush=True)
    return runtime


def _new_server_key(runtime: Runtime) -> str:
    """Where a server key made by this process lives, for the line the command prints."""
    key = runtime.server_key
    if key is None or not key.created:
        return ""
    return f"; webhook secrets derive from the new server key {key.source} (0600): back it up"
