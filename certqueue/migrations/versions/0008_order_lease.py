"""orders and deployments: lease_until, lease_token: which step works on an order at the CA (or on a
region's target), without a row lock held while the remote side answers (a worker that dies
mid-step leaves a lease that simply runs out)

Revision ID: 0008
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from certqueue.models import UTCDateTime

revision: str = "0008"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("orders", "deployments"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("lease_until", UTCDateTime(timezone=True), nullable=True))
            batch.add_column(sa.Column("lease_token", sa.String(32), nullable=True))


def downgrade() -> None:
    for table in ("deployments", "orders"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("lease_token")
            batch.drop_column("lease_until")
