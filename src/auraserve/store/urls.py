"""Database URLs as people write them, as SQLAlchemy needs them (no imports: config uses it)."""

from __future__ import annotations


def normalise_database_url(url: str) -> str:
    """The SQLAlchemy URL for what people write: `postgres://` (Heroku, Render, Supabase and
    libpq all hand these out) and `postgresql://` both mean PostgreSQL through psycopg 3."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    dialect, plus, driver = scheme.partition("+")
    if dialect in ("postgres", "postgresql"):
        return f"postgresql+{driver if plus else 'psycopg'}://{rest}"
    return url
