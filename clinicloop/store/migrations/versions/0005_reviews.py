"""Add turn_scores.red_flags, and create the tables of what people add: reviewers' verdict
labels, rubric edits and notes, and apps' feedback on responses.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _turn_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["turn_id"], ["turns.id"], ondelete="CASCADE",
                                   name=op.f(f"fk_{table}_turn_id_turns"))


def upgrade() -> None:
    with op.batch_alter_table("turn_scores") as batch:
        batch.add_column(sa.Column("red_flags", sa.Integer(), nullable=True))
    op.create_table(
        "verdict_labels",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("turn_id", sa.String(), nullable=False),
        sa.Column("item_key", sa.String(), nullable=False),
        sa.Column("item", _JSON, nullable=False),
        sa.Column("criteria_met", sa.Boolean(), nullable=False),
        sa.Column("verdict_key", sa.String(), nullable=True),
        sa.Column("reviewer", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _turn_fk("verdict_labels"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verdict_labels")),
    )
    op.create_index(op.f("ix_verdict_labels_turn_id"), "verdict_labels", ["turn_id"])
    op.create_index(op.f("ix_verdict_labels_item_key"), "verdict_labels", ["item_key"])
    op.create_table(
        "rubric_edits",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("prefix_hash", sa.String(), nullable=False),
        sa.Column("turn_id", sa.String(), nullable=True),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("target_key", sa.String(), nullable=True),
        sa.Column("item", _JSON, nullable=True),
        sa.Column("reviewer", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rubric_edits")),
    )
    op.create_index(op.f("ix_rubric_edits_prefix_hash"), "rubric_edits", ["prefix_hash"])
    op.create_table(
        "review_notes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("turn_id", sa.String(), nullable=False),
        sa.Column("conversation_id", sa.String(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("reviewer", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _turn_fk("review_notes"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_notes")),
    )
    op.create_index(op.f("ix_review_notes_turn_id"), "review_notes", ["turn_id"])
    op.create_index(op.f("ix_review_notes_conversation_id"), "review_notes",
                    ["conversation_id"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("turn_id", sa.String(), nullable=False),
        sa.Column("rating", sa.String(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("api_key_id", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _turn_fk("feedback"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    op.create_index(op.f("ix_feedback_turn_id"), "feedback", ["turn_id"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("review_notes")
    op.drop_table("rubric_edits")
    op.drop_table("verdict_labels")
    with op.batch_alter_table("turn_scores") as batch:
        batch.drop_column("red_flags")
