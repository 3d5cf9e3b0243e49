"""who wrote a ledger entry by hand

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 19:00:00.000000

Operators grant and deduct credits over the admin API (`/v2/admin/…`): each such entry keeps
the key id of the admin key that wrote it, so the ledger says who moved the money as well as
why (`note`). NULL for entries the system wrote (reservations, settlements) and for grants
made from the shell.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("ledger", sa.Column("actor_key_id", sa.String(40), nullable=True))


def downgrade() -> None:
    op.drop_column("ledger", "actor_key_id")
