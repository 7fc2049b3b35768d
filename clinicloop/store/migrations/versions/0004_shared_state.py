"""Create the tables several replicas and workers share: the model registry's state, sticky
conversation pins, and scorers' claims on turns.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_state",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_registry_state")),
    )
    op.create_table(
        "sticky_pins",
        sa.Column("conversation", sa.String(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("last_used", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("conversation", name=op.f("pk_sticky_pins")),
    )
    op.create_index(op.f("ix_sticky_pins_version"), "sticky_pins", ["version"])
    op.create_index(op.f("ix_sticky_pins_last_used"), "sticky_pins", ["last_used"])
    op.create_table(
        "score_claims",
        sa.Column("turn_id", sa.String(), nullable=False),
        sa.Column("worker", sa.String(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["turn_id"], ["turns.id"], ondelete="CASCADE",
                                name=op.f("fk_score_claims_turn_id_turns")),
        sa.PrimaryKeyConstraint("turn_id", name=op.f("pk_score_claims")),
    )
    op.create_index(op.f("ix_score_claims_expires_at"), "score_claims", ["expires_at"])


def downgrade() -> None:
    op.drop_table("score_claims")
    op.drop_table("sticky_pins")
    op.drop_table("registry_state")
