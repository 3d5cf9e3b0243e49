"""an account's requests, newest first, by index

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 05:30:00.000000

`GET /v2/requests` (store/history.py) lists one account's jobs by `(created_at, id)`
descending, a page at a time from a cursor. With only `(account_id, status)` indexed, every
page read all of the account's jobs and sorted them; with this index a page reads its rows.
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_account_created", "jobs", ["account_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_account_created", table_name="jobs")
