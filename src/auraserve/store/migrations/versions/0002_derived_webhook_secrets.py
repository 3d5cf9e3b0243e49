"""webhook secrets derived from the server key, not stored

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 22:40:00.000000

The plaintext `accounts.webhook_secret` column is dropped, not carried over: secrets are now
HMAC(server key, account id, version), which cannot reproduce an old random secret, and keeping
the old one in any reversible form would keep a usable secret at rest. Every account starts at
version 1; its receivers need the new secret (`auraserve keys webhook-secret ACCOUNT`), or
`auraserve keys rotate-webhook-secret ACCOUNT` to hand one over with a grace period later.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE, no batch copy: SQLite 3.35+ (which the store requires) drops a column
    # in place, and a table copy would trip the api_keys foreign key.
    op.add_column(
        "accounts",
        sa.Column("webhook_secret_version", sa.Integer(), server_default="1", nullable=False),
    )
    op.add_column("accounts", sa.Column("webhook_previous_version", sa.Integer(), nullable=True))
    op.add_column("accounts", sa.Column("webhook_previous_until", sa.Double(), nullable=True))
    op.drop_column("accounts", "webhook_secret")


def downgrade() -> None:
    # The old secrets are gone; a downgrade gives every account an empty one, which signing
    # refuses (webhooks.signing.secret_key), so nothing is sent unsigned.
    op.add_column(
        "accounts",
        sa.Column("webhook_secret", sa.String(length=100), server_default="", nullable=False),
    )
    op.drop_column("accounts", "webhook_previous_until")
    op.drop_column("accounts", "webhook_previous_version")
    op.drop_column("accounts", "webhook_secret_version")
