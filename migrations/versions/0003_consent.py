"""consent: a denial is recorded too

A consent row records the user's decision: ``granted`` (the consent, active
until it expires or is withdrawn) or ``denied`` (kept for the record and the
FHIR export, never active: its ``withdrawn`` is the time of the decision).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('consent', schema=None) as batch_op:
        batch_op.add_column(sa.Column('decision', sa.String(length=16), server_default='granted', nullable=False))


def downgrade() -> None:
    op.execute("DELETE FROM consent WHERE decision = 'denied'")  # 0002 has no place for denials
    with op.batch_alter_table('consent', schema=None) as batch_op:
        batch_op.drop_column('decision')
