"""certificates.not_after (denormalised expiry), ari_next_check_at, orders by status

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import certqueue.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("certificates") as batch:
        batch.add_column(sa.Column("not_after", certqueue.models.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("ari_next_check_at", certqueue.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch.create_index("ix_certificates_not_after", ["not_after"])
        batch.create_index("ix_certificates_ari_next_check_at", ["ari_next_check_at"])
    op.create_index("ix_orders_status", "orders", ["status"])
    # backfill from the served issuance
    op.execute(
        "UPDATE certificates SET not_after = (SELECT issuances.not_after FROM issuances "
        "WHERE issuances.id = certificates.current_issuance_id) WHERE current_issuance_id IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_index("ix_orders_status", table_name="orders")
    with op.batch_alter_table("certificates") as batch:
        batch.drop_index("ix_certificates_ari_next_check_at")
        batch.drop_index("ix_certificates_not_after")
        batch.drop_column("ari_next_check_at")
        batch.drop_column("not_after")
