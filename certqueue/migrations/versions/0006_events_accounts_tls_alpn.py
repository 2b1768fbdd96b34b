"""event_deliveries: the outbox of lifecycle events for subscribers (webhooks, Celery tasks);
accounts.status, deactivated_at, key_changed_at and account_key_rollovers (RFC 8555 7.3.5, 7.3.6);
tls_alpn01_tokens (RFC 8737)

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from certqueue.models import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "event_deliveries",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("subscriber", sa.String(64), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("certificate_id", sa.String(40), nullable=True),
        sa.Column("idempotency_key", sa.String(64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("occurred_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(512), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["event_id"], ["events.id"]),
        sa.UniqueConstraint("idempotency_key"),
    )
    op.create_index("ix_event_deliveries_status_next", "event_deliveries", ["status", "next_attempt_at"])
    op.create_index("ix_event_deliveries_certificate", "event_deliveries", ["certificate_id"])
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="valid"))
        batch.add_column(sa.Column("deactivated_at", UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("key_changed_at", UTCDateTime(timezone=True), nullable=True))
    op.create_table(
        "account_key_rollovers",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("account_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("key_enc", sa.LargeBinary(), nullable=True),
        sa.Column("key_type", sa.String(16), nullable=False),
        sa.Column("old_thumbprint", sa.String(64), nullable=False),
        sa.Column("new_thumbprint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.String(512), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
    )
    op.create_index(
        "ix_account_key_rollovers_account", "account_key_rollovers", ["account_id", "status"]
    )


    op.create_table(
        "tls_alpn01_tokens",
        sa.Column("token", sa.String(256), primary_key=True),
        sa.Column("identifier", sa.String(255), nullable=False),
        sa.Column("key_authorization", sa.String(512), nullable=False),
        sa.Column("certificate_id", sa.String(40), nullable=False),
        sa.Column("challenge_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_tls_alpn01_tokens_identifier", "tls_alpn01_tokens", ["identifier", "expires_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_tls_alpn01_tokens_identifier", table_name="tls_alpn01_tokens")
    op.drop_table("tls_alpn01_tokens")
    op.drop_index("ix_account_key_rollovers_account", table_name="account_key_rollovers")
    op.drop_table("account_key_rollovers")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("key_changed_at")
        batch.drop_column("deactivated_at")
        batch.drop_column("status")
    op.drop_index("ix_event_deliveries_certificate", table_name="event_deliveries")
    op.drop_index("ix_event_deliveries_status_next", table_name="event_deliveries")
    op.drop_table("event_deliveries")
