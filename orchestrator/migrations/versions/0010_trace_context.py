"""trace context of outbox rows and of an instance's first trace

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    # W3C traceparent/tracestate as JSON; NULL when tracing is off (adding a NULL column rewrites nothing)
    op.add_column('outbox', sa.Column('trace_context', JSON, nullable=True))
    op.add_column('workflow_instances', sa.Column('trace_context', JSON, nullable=True))


def downgrade() -> None:
    op.drop_column('workflow_instances', 'trace_context')
    op.drop_column('outbox', 'trace_context')
