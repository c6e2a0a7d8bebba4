"""nodes.state_bytes: the model-state bytes a device last reported, beside its budget

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 07:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("state_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("state_bytes")
