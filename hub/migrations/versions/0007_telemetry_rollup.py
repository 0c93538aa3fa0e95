"""Hourly telemetry history kept when raw points are pruned.

Revision ID: 0007_telemetry_rollup
Revises: 0006_ui_sessions
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from hub.models import BigId, UTCDateTime

revision: str = "0007_telemetry_rollup"
down_revision: str | None = "0006_ui_sessions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create telemetry_rollup."""
    op.create_table(
        "telemetry_rollup",
        sa.Column("id", BigId, nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("hour", UTCDateTime(timezone=True), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("sum", sa.Float(), nullable=False),
        sa.Column("min", sa.Float(), nullable=False),
        sa.Column("max", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "name", "hour", name="uq_telemetry_rollup"),
    )
    op.create_index("ix_telemetry_rollup_device_id", "telemetry_rollup", ["device_id"])


def downgrade() -> None:
    """Drop telemetry_rollup."""
    op.drop_index("ix_telemetry_rollup_device_id", table_name="telemetry_rollup")
    op.drop_table("telemetry_rollup")
