"""DPoP: a proof's jti is spent by the audit record of the request that sent it

Each audit record gains ``dpop_jti``, the jti of the request's DPoP proof, unique
per proof key (``ix_audit_event_dpop_proof`` on ``dpop_jkt, dpop_jti``, partial:
only records of requests with a proof). The record is committed before the answer,
so a proof is single use across workers and instances with one insert per request
and no second table (0007 spent proofs' jtis in ``assertion_jti``; those rows lapse
there within two minutes, as before).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 12:30:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

PROOFS = sa.text("dpop_jti IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dpop_jti', sa.String(length=255), nullable=True))
    op.create_index('ix_audit_event_dpop_proof', 'audit_event', ['dpop_jkt', 'dpop_jti'], unique=True,
                    sqlite_where=PROOFS, postgresql_where=PROOFS)


def downgrade() -> None:
    # 0007 spends proofs' jtis in assertion_jti and does not know the ones spent here: a
    # proof is accepted for 60 s after its iat, so keep the service stopped for a minute
    # before starting the older version.
    op.drop_index('ix_audit_event_dpop_proof', table_name='audit_event')
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_column('dpop_jti')
