"""scale-out: media objects, the worker registry, admin accounts

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 01:00:00.000000

Existing COMPLETED jobs' images get media_objects rows (from their output JSON), so the orphan
sweep never mistakes an old image for one that nothing owns.
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("is_admin", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    media_objects = op.create_table(
        "media_objects",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_index("ix_media_objects_job", "media_objects", ["job_id"])
    op.create_index("ix_media_objects_created", "media_objects", ["created_at"])
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("device", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("jobs_done", sa.Integer(), server_default="0", nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("last_seen_at", sa.Double(), nullable=False),
        sa.Column("stopped_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_workers_seen", "workers", ["last_seen_at"])

    conn = op.get_bind()
    rows = conn.execute(
        sa.text("SELECT id, output, completed_at FROM jobs WHERE output IS NOT NULL")
    ).fetchall()
    owned = [
        {"name": name, "job_id": job_id, "created_at": completed_at or 0.0}
        for job_id, output, completed_at in rows
        for name in (json.loads(output).get("media") or [])
    ]
    if owned:
        op.bulk_insert(media_objects, owned)


def downgrade() -> None:
    op.drop_index("ix_workers_seen", table_name="workers")
    op.drop_table("workers")
    op.drop_index("ix_media_objects_created", table_name="media_objects")
    op.drop_index("ix_media_objects_job", table_name="media_objects")
    op.drop_table("media_objects")
    op.drop_column("accounts", "is_admin")
