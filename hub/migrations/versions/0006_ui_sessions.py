"""Server-side dashboard sessions: a random id bound to an API key, ended by logout and revocation.

Revision ID: 0006_ui_sessions
Revises: 0005_token_label_keys
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from hub.models import UTCDateTime

revision: str = "0006_ui_sessions"
down_revision: str | None = "0005_token_label_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ui_session."""
    op.create_table(
        "ui_session",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_key.id"]),
        sa.PrimaryKeyConstraint("id_hash"),
    )
    op.create_index("ix_ui_session_api_key_id", "ui_session", ["api_key_id"])


def downgrade() -> None:
    """Drop ui_session."""
    op.drop_index("ix_ui_session_api_key_id", table_name="ui_session")
    op.drop_table("ui_session")
