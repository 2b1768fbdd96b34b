"""drift_cursors (drift checks every deployment of a region, a batch at a time); the CA's ARI window

Revision ID: 0007
Revises: 0008

Numbered 0007 (reserved for issue 14) but applied after 0008 (order leases), which reached main
first; a 0006 merged later goes after this one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import certqueue.models

revision: str = "0007"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "drift_cursors",
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("after_id", sa.BigInteger(), nullable=False),
        sa.Column("pass_started_at", certqueue.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("passes", sa.Integer(), nullable=False),
        sa.Column("checked", sa.Integer(), nullable=False),
        sa.Column("updated_at", certqueue.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("region"),
    )
    with op.batch_alter_table("certificates") as batch:
        batch.add_column(
            sa.Column("ari_window_start", certqueue.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("ari_window_end", certqueue.models.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("ari_explanation_url", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("certificates") as batch:
        batch.drop_column("ari_explanation_url")
        batch.drop_column("ari_window_end")
        batch.drop_column("ari_window_start")
    op.drop_table("drift_cursors")
