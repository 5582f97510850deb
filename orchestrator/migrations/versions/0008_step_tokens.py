"""tokens of external steps' items

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'step_tokens',
        sa.Column('token', sa.String(length=255), nullable=False),
        sa.Column('instance_id', sa.String(length=36), nullable=False),
        sa.Column('step', sa.String(length=64), nullable=False),
        sa.Column('branch', sa.Integer(), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['instance_id'], ['workflow_instances.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('token'),
    )
    op.create_index('ix_step_tokens_instance_id', 'step_tokens', ['instance_id'])


def downgrade() -> None:
    op.drop_index('ix_step_tokens_instance_id', table_name='step_tokens')
    op.drop_table('step_tokens')
