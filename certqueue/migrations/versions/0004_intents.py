"""intents: every request is a row, written with the change it asks for (pipeline v2);
certificates.waiting_reason: why a certificate waits (a rate limit, capacity)

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from certqueue.models import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "intents",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("certificate_id", sa.String(40), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("not_before", UTCDateTime(timezone=True), nullable=False),
        sa.Column("deadline", UTCDateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(512), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", UTCDateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_intents_status_not_before", "intents", ["status", "not_before"])
    op.create_index("ix_intents_certificate_status", "intents", ["certificate_id", "status"])
    with op.batch_alter_table("certificates") as batch:
        batch.add_column(sa.Column("waiting_reason", sa.String(256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("certificates") as batch:
        batch.drop_column("waiting_reason")
    op.drop_index("ix_intents_certificate_status", table_name="intents")
    op.drop_index("ix_intents_status_not_before", table_name="intents")
    op.drop_table("intents")
