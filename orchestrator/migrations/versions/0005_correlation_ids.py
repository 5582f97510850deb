"""correlation ids on instances and outbox messages, for logs that follow one request

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('workflow_instances', sa.Column('correlation_id', sa.String(length=64), nullable=True))
    op.add_column('outbox', sa.Column('correlation_id', sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column('outbox', 'correlation_id')
    op.drop_column('workflow_instances', 'correlation_id')
