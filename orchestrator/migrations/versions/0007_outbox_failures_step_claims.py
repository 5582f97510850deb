"""outbox rows that failed for good, and exclusive step claims

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('outbox', sa.Column('failed_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('step_runs', sa.Column('dispatches', sa.Integer(), server_default='0', nullable=False))
    op.create_table(
        'step_claims',
        sa.Column('instance_id', sa.String(length=36), nullable=False),
        sa.Column('step', sa.String(length=64), nullable=False),
        sa.Column('task', sa.String(length=128), nullable=False),
        sa.Column('branch', sa.Integer(), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('dispatch', sa.Integer(), nullable=False),
        sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['instance_id'], ['workflow_instances.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('instance_id', 'step', 'task', 'branch'),
    )


def downgrade() -> None:
    op.drop_table('step_claims')
    op.drop_column('step_runs', 'dispatches')
    op.drop_column('outbox', 'failed_at')
