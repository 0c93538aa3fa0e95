"""Device certificates: the serial of the certificate a device got at enrollment (issue "Trust").

Revision ID: 0010_device_certificates
Revises: 0009_signing_keys
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_device_certificates"
down_revision: str | None = "0009_signing_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("device") as batch:
        batch.add_column(sa.Column("certificate_serial", sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("device") as batch:
        batch.drop_column("certificate_serial")
