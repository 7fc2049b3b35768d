"""Add `turns.origin`: `client` (patient traffic) or `service` (the project's own calls).

Rows logged before it are `client`: nothing told the two apart then.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("origin", sa.String(), nullable=False,
                                     server_default="client"))


def downgrade() -> None:
    # batch: SQLite before 3.35 has no DROP COLUMN; Alembic copies the table instead.
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("origin")
