"""Create the verifier's tables: rubric sets, per-item verdicts, and per-turn scores.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "rubric_sets",
        sa.Column("prefix_hash", sa.String(), nullable=False),
        sa.Column("items", _JSON, nullable=False),
        sa.Column("generator_model", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("prefix_hash", name=op.f("pk_rubric_sets")),
    )
    op.create_table(
        "verdicts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("turn_id", sa.String(), nullable=False),
        sa.Column("verdict_key", sa.String(), nullable=False),
        sa.Column("item", _JSON, nullable=False),
        sa.Column("judge_model", sa.String(), nullable=False),
        sa.Column("template", sa.String(), nullable=False),
        sa.Column("criteria_met", sa.Boolean(), nullable=True),
        sa.Column("explanation", sa.Text(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["turn_id"], ["turns.id"], ondelete="CASCADE",
                                name=op.f("fk_verdicts_turn_id_turns")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verdicts")),
        sa.UniqueConstraint("verdict_key", name=op.f("uq_verdicts_verdict_key")),
    )
    op.create_index(op.f("ix_verdicts_turn_id"), "verdicts", ["turn_id"])
    op.create_table(
        "turn_scores",
        sa.Column("turn_id", sa.String(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("metrics", _JSON, nullable=False),
        sa.Column("n_items", sa.Integer(), nullable=False),
        sa.Column("n_unparseable", sa.Integer(), nullable=False),
        sa.Column("judge_model", sa.String(), nullable=False),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["turn_id"], ["turns.id"], ondelete="CASCADE",
                                name=op.f("fk_turn_scores_turn_id_turns")),
        sa.PrimaryKeyConstraint("turn_id", name=op.f("pk_turn_scores")),
    )
    for column in ("judge_model", "scored_at"):
        op.create_index(op.f(f"ix_turn_scores_{column}"), "turn_scores", [column])


def downgrade() -> None:
    for column in ("judge_model", "scored_at"):
        op.drop_index(op.f(f"ix_turn_scores_{column}"), table_name="turn_scores")
    op.drop_table("turn_scores")
    op.drop_index(op.f("ix_verdicts_turn_id"), table_name="verdicts")
    op.drop_table("verdicts")
    op.drop_table("rubric_sets")
