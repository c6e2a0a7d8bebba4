"""nodes.process_rss_bytes and nodes.board_rss_bytes: the peak RSS a board's processes reported

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 21:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("process_rss_bytes", sa.BigInteger(), nullable=True))
    op.add_column("nodes", sa.Column("board_rss_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("board_rss_bytes")
        batch.drop_column("process_rss_bytes")
