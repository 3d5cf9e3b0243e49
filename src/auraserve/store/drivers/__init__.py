"""The backends, one driver module each (`base.Driver` is the interface), chosen once from the
database URL by `open_driver`. This module only reads URLs and imports nothing heavy: the
settings validate and normalise `AURASERVE_DATABASE_URL` with it, and the chosen driver's
module (SQLAlchemy's dialect, psycopg) loads only when a store opens.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from auraserve.store.drivers.base import Driver

# URL scheme (before any `+driver`) -> (driver module, the SQLAlchemy scheme it takes).
# `postgres://` (Heroku, Render, Supabase and libpq hand these out) and `postgresql://` both
# mean PostgreSQL through psycopg 3.
_SCHEMES = {
    "sqlite": ("sqlite", "sqlite"),
    "postgresql": ("postgresql", "postgresql+psycopg"),
    "postgres": ("postgresql", "postgresql+psycopg"),
}
_DRIVERS = {"sqlite": "SqliteDriver", "postgresql": "PostgresDriver"}


def check_url(url: str) -> None:
    """Raise ValueError for a URL no driver takes."""
    scheme = url.partition("://")[0].partition("+")[0]
    if "://" not in url or scheme not in _SCHEMES:
        raise ValueError("must start with sqlite://, postgresql:// or postgres://")


def normalise_url(url: str) -> str:
    """The SQLAlchemy URL for what people write (`postgres://…` → `postgresql+psycopg://…`);
    an explicit `+driver` is kept."""
    scheme, sep, rest = url.partition("://")
    backend, plus, driver = scheme.partition("+")
    if not sep or backend not in _SCHEMES:
        return url
    canonical = _SCHEMES[backend][1]
    if plus:
        canonical = f"{canonical.partition('+')[0]}+{driver}"
    return f"{canonical}://{rest}"


def file_url(path: Path) -> str:
    """The URL of a store in a local file (the default, in the data dir)."""
    return f"sqlite:///{path.resolve()}"


def open_driver(url: str) -> Driver:
    """The driver for `url` (normalised first)."""
    url = normalise_url(url)
    check_url(url)
    module_name = _SCHEMES[url.partition("://")[0].partition("+")[0]][0]
    module = importlib.import_module(f"{__name__}.{module_name}")
    driver: Driver = getattr(module, _DRIVERS[module_name])(url)
    return driver
