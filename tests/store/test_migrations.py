"""The Alembic migrations build exactly the schema that `store/schema.py` declares."""

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from auraserve.store.db import Store
from auraserve.store.schema import metadata


def test_migrations_match_the_declared_schema(db: Store) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_migrate_is_idempotent(db: Store) -> None:
    db.migrate()
    db.migrate()


def test_head_revision_constant_is_alembics_head() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from auraserve.store.db import MIGRATIONS_DIR
    from auraserve.store.migrations import HEAD_REVISION

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION


def test_a_current_store_is_recognised_and_a_new_one_is_not(db: Store, tmp_path: Path) -> None:
    assert db.schema_is_current()
    fresh = Store(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        assert not fresh.schema_is_current()
        fresh.migrate()
        assert fresh.schema_is_current()
    finally:
        fresh.dispose()
