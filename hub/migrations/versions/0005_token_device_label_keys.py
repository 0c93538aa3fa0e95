"""Enrollment tokens decide which label keys a device may set itself.

Revision ID: 0005_token_label_keys
Revises: 0004_training_jobs
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_token_label_keys"
down_revision: str | None = "0004_training_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add enrollment_token.device_label_keys (NULL = any key but the protected ones)."""
    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.add_column(sa.Column("device_label_keys", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Drop enrollment_token.device_label_keys."""
    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.drop_column("device_label_keys")
