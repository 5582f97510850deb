"""workers table of the worker deployment workflow (seed 001)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('worker_id', sa.String(length=36), nullable=False),
    sa.Column('scenario_uuid', sa.String(length=36), nullable=False),
    sa.Column('camera_url', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=50), nullable=False, server_default='pending'),
    sa.Column('process_pid', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('worker_id')
    )
    op.create_index('ix_workers_scenario_uuid', 'workers', ['scenario_uuid'])
    op.create_index('ix_workers_status', 'workers', ['status'])


def downgrade() -> None:
    op.drop_index('ix_workers_status', table_name='workers')
    op.drop_index('ix_workers_scenario_uuid', table_name='workers')
    op.drop_table('workers')
