"""Captured items: hard examples devices upload for labelling (issue "Closed loop").

Revision ID: 0008_captures
Revises: 0007_telemetry_rollup
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import hub.models

revision: str = "0008_captures"
down_revision: str | None = "0007_telemetry_rollup"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "captured_item",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("content_type", sa.String(length=128), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("outputs", sa.JSON(), nullable=False),
        sa.Column("prediction", sa.String(length=256), nullable=True),
        sa.Column("label", sa.String(length=256), nullable=True),
        sa.Column("labelled_by", sa.String(length=128), nullable=True),
        sa.Column("labelled_at", hub.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("captured_at", hub.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_at", hub.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("captured_item", schema=None) as batch_op:
        batch_op.create_index("ix_captured_item_model_created", ["model", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_captured_item_device_id"), ["device_id"], unique=False)


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("captured_item", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_captured_item_device_id"))
        batch_op.drop_index("ix_captured_item_model_created")
    op.drop_table("captured_item")
