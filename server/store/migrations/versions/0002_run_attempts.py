"""run attempts: the owning Flower run (fencing token) and the resume count

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 15:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("attempt", sa.String(length=32), nullable=True))
    op.add_column("runs", sa.Column("resumes", sa.Integer(), nullable=False, server_default="0"))
    # Before attempts existed, every run was owned by the Flower run of the same id.
    op.execute("UPDATE runs SET attempt = run_id")


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("resumes")
        batch.drop_column("attempt")
