"""rounds.replayed: how many kept updates the update memory replayed in a round

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 01:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rounds", sa.Column("replayed", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("replayed")
