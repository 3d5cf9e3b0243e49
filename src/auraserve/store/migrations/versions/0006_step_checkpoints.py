"""step checkpoints and live previews

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 00:00:00.000000

A running job's newest sampler checkpoint (`job_checkpoints`, one row per job; the bytes are in
the media store) and the step a resumed attempt started from (`jobs.progress_resumed_from`),
so a worker that takes a job over continues where the last one stopped; and live previews: until
when someone watches a job (`jobs.preview_wanted_until`, renewed by open status streams) and the
newest preview its worker made (`job_previews`, one row per job).
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("progress_resumed_from", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("preview_wanted_until", sa.Double(), nullable=True))
    op.create_table(
        "job_previews",
        sa.Column(
            "job_id",
            sa.String(length=36),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("images", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_table(
        "job_checkpoints",
        sa.Column(
            "job_id",
            sa.String(length=36),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(length=100), nullable=False, unique=True),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("worker_id", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_previews")
    op.drop_table("job_checkpoints")
    op.drop_column("jobs", "preview_wanted_until")
    op.drop_column("jobs", "progress_resumed_from")
