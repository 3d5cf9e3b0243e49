"""Alembic migrations of the store's schema (`versions/`, one file per revision)."""

# The newest revision, so a process can tell a current store from one that needs migrating
# without importing Alembic (tests/store/test_migrations.py checks it equals Alembic's head).
HEAD_REVISION = "0006"
