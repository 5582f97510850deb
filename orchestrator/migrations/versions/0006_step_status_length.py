"""step status wide enough for 'compensation_failed'

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite does not enforce a VARCHAR length (and cannot alter a column in place).
    if op.get_bind().dialect.name != 'sqlite':
        op.alter_column('step_runs', 'status', type_=sa.String(length=32),
                        existing_type=sa.String(length=16), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'sqlite':
        op.alter_column('step_runs', 'status', type_=sa.String(length=16),
                        existing_type=sa.String(length=32), existing_nullable=False)
