"""process_heartbeats: which keyring each live process encrypts with (two-phase key rotation)

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import certqueue.models

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "process_heartbeats",
        sa.Column("process", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("keyring_id", sa.String(length=32), nullable=False),
        sa.Column("active_kid", sa.String(length=32), nullable=False),
        sa.Column("loaded_at", certqueue.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("seen_at", certqueue.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("process"),
    )


def downgrade() -> None:
    op.drop_table("process_heartbeats")
