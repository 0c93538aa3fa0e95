"""Training jobs in the database: training_job (the queue) and training_data (uploaded archives).

Revision ID: 0004_training_jobs
Revises: 0003_rollouts
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import hub.models

revision: str = "0004_training_jobs"
down_revision: str | None = "0003_rollouts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create training_data and training_job."""
    op.create_table(
        "training_data",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", hub.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "training_job",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("task", sa.Text(), nullable=False),
        sa.Column("base_dir", sa.String(length=4096), nullable=True),
        sa.Column("data_id", sa.String(length=64), nullable=True),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("resource", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("note", sa.String(length=1024), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("losses", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("study_name", sa.String(length=128), nullable=True),
        sa.Column("helpers", sa.Integer(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("log", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.Column("created_at", hub.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", hub.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", hub.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", hub.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["data_id"], ["training_data.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("training_job", schema=None) as batch_op:
        batch_op.create_index("ix_training_job_status_created", ["status", "created_at"], unique=False)


def downgrade() -> None:
    """Drop training_job and training_data."""
    with op.batch_alter_table("training_job", schema=None) as batch_op:
        batch_op.drop_index("ix_training_job_status_created")
    op.drop_table("training_job")
    op.drop_table("training_data")
