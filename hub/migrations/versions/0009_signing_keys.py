"""Signing keys: the chain of manifest-signing keys (issue "Trust", key rotation).

Revision ID: 0009_signing_keys
Revises: 0008_captures
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import hub.models

revision: str = "0009_signing_keys"
down_revision: str | None = "0008_captures"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "signing_key",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("previous_key_id", sa.String(length=16), nullable=True),
        sa.Column("endorsement", sa.JSON(), nullable=True),
        sa.Column("created_at", hub.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("retired_at", hub.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("retirement", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("key_id"),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("signing_key")
