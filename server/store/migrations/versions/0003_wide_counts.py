"""64-bit columns for every integer a device reports or a model size reaches

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 07:00:00

A device's k and partition id are 64-bit in its reply (accepted up to 2**62),
and PostgreSQL's INTEGER would overflow at publish.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_WIDENED = {
    "nodes": ("k", "partition_id"),
    "rounds": ("tracked",),
    "models": ("size", "tracked"),
}
_NULLABLE = {("nodes", "k"), ("nodes", "partition_id")}


def _alter(to: type[sa.types.TypeEngine], frm: type[sa.types.TypeEngine]) -> None:
    for table, columns in _WIDENED.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.alter_column(
                    column, type_=to(), existing_type=frm(), existing_nullable=(table, column) in _NULLABLE
                )


def upgrade() -> None:
    _alter(sa.BigInteger, sa.Integer)


def downgrade() -> None:
    _alter(sa.Integer, sa.BigInteger)
