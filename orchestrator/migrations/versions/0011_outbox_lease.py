"""a publish lease on outbox rows: the process still sending a row keeps sweepers off it

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""
from alembic import op
import sqlalchemy as sa

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for every row but those a lagging relay still holds (adding a NULL column rewrites nothing)
    op.add_column('outbox', sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('outbox', 'lease_until')
