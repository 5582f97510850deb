"""instance version, bumped by every transaction that writes to an instance

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('workflow_instances',
                  sa.Column('version', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    op.drop_column('workflow_instances', 'version')
