"""The Alembic migrations build exactly the schema that `store/schema.py` declares."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from auraserve.store.db import Database
from auraserve.store.schema import metadata


def test_migrations_match_the_declared_schema(db: Database) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_migrate_is_idempotent(db: Database) -> None:
    db.migrate()
    db.migrate()
