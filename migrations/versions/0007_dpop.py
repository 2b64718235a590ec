"""DPoP: clients and trusts can require a proof; the audit names the proof's key

``client add|update --require-dpop`` and ``trust add|update --require-dpop``
(RFC 9449 §5.2 ``dpop_bound_access_tokens``) refuse requests without a DPoP
proof. Each audit record gains ``dpop_jkt``: the RFC 7638 thumbprint of the
proof's key, or null.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 09:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('client', schema=None) as batch_op:
        batch_op.add_column(sa.Column('require_dpop', sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table('trust', schema=None) as batch_op:
        batch_op.add_column(sa.Column('require_dpop', sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dpop_jkt', sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Before 0007 nothing requires a proof: clients and trusts that did accept bearer
    # requests again, and the audit forgets which key proofs were made with.
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_column('dpop_jkt')
    with op.batch_alter_table('trust', schema=None) as batch_op:
        batch_op.drop_column('require_dpop')
    with op.batch_alter_table('client', schema=None) as batch_op:
        batch_op.drop_column('require_dpop')
