"""certificates.directory_urls: the ordered list of CAs a certificate may fall back through

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("certificates") as batch:
        batch.add_column(sa.Column("directory_urls", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("certificates") as batch:
        batch.drop_column("directory_urls")
