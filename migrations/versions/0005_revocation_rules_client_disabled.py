"""revocation rules; a client can be disabled

``token revoke`` (and ``trust remove``, ``client remove``, ``client disable``,
``link remove``) records one revocation_rule row per command: its kind, the
fields the kind names, and its time; every minted token it covers that was
issued before that time introspects inactive. Clients gain ``disabled``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 10:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('revocation_rule',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('client_id', sa.String(length=255), nullable=True),
    sa.Column('issuer', sa.String(length=2048), nullable=True),
    sa.Column('target', sa.String(length=2048), nullable=True),
    sa.Column('source', sa.String(length=2048), nullable=True),
    sa.Column('patient', sa.String(length=255), nullable=True),
    sa.Column('fhir_user', sa.String(length=2048), nullable=True),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('revocation_rule', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_revocation_rule_time'), ['time'], unique=False)
    with op.batch_alter_table('client', schema=None) as batch_op:
        batch_op.add_column(sa.Column('disabled', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    # 0004 has no place for either: a disabled client becomes usable again and the
    # revoked tokens introspect active until they expire.
    with op.batch_alter_table('client', schema=None) as batch_op:
        batch_op.drop_column('disabled')
    with op.batch_alter_table('revocation_rule', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_revocation_rule_time'))
    op.drop_table('revocation_rule')
