"""bulk operations: a job per POST /sagas/bulk and a row per instance it acts on

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), 'postgresql')


def upgrade() -> None:
    op.create_table(
        'bulk_jobs',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('action', sa.String(length=16), nullable=False),
        sa.Column('step', sa.String(length=64), nullable=True),
        sa.Column('event', sa.String(length=64), nullable=True),
        sa.Column('payload', JSON, nullable=False),
        sa.Column('filter', JSON, nullable=False),
        sa.Column('rate_per_second', sa.Float(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('matched', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('next_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('owner', sa.String(length=64), nullable=True),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_bulk_jobs_status', 'bulk_jobs', ['status', 'lease_until'])
    op.create_table(
        'bulk_items',
        sa.Column('bulk_id', sa.String(length=36), nullable=False),
        sa.Column('instance_id', sa.String(length=36), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['bulk_id'], ['bulk_jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('bulk_id', 'instance_id'),
    )
    op.create_index('ix_bulk_items_status', 'bulk_items', ['bulk_id', 'status', 'position'])


def downgrade() -> None:
    op.drop_index('ix_bulk_items_status', table_name='bulk_items')
    op.drop_table('bulk_items')
    op.drop_index('ix_bulk_jobs_status', table_name='bulk_jobs')
    op.drop_table('bulk_jobs')
