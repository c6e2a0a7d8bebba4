"""nodes.peak_bytes and nodes.trainer: a device's measured step peak and the trainer its budget chose

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 12:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("peak_bytes", sa.BigInteger(), nullable=True))
    op.add_column("nodes", sa.Column("trainer", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("trainer")
        batch.drop_column("peak_bytes")
