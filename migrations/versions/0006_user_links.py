"""the user at the target: user links, target and issuer options, audit fields

``user_link`` maps (source user URL, target) to the target's own reference for that
user (origin table, matched or blocked, with the system that matched and when).
Targets gain ``users`` (as-is | mapped) and ``user_match_identifiers``; issuers
``user_identifier_systems`` and ``user_identifier_claim``; audit records
``user_link``, ``source_user`` and ``target_user``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 09:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('user_link',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user', sa.String(length=2048), nullable=False),
    sa.Column('target_id', sa.Integer(), nullable=False),
    sa.Column('target_user', sa.String(length=320), nullable=True),
    sa.Column('origin', sa.String(length=16), server_default='table', nullable=False),
    sa.Column('system', sa.String(length=2048), nullable=True),
    sa.Column('matched_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['target_id'], ['target.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('user', 'target_id', name='uq_user_link')
    )
    with op.batch_alter_table('user_link', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_user_link_target_id'), ['target_id'], unique=False)
    with op.batch_alter_table('target', schema=None) as batch_op:
        batch_op.add_column(sa.Column('users', sa.String(length=16), server_default='as-is', nullable=False))
        batch_op.add_column(sa.Column('user_match_identifiers', sa.JSON(), server_default='[]', nullable=False))
    with op.batch_alter_table('issuer', schema=None) as batch_op:
        batch_op.add_column(sa.Column('user_identifier_systems', sa.JSON(), server_default='[]', nullable=False))
        batch_op.add_column(sa.Column('user_identifier_claim', sa.String(length=64),
                                      server_default='fhirUser_identifier', nullable=False))
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('user_link', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('source_user', sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column('target_user', sa.String(length=320), nullable=True))


def downgrade() -> None:
    # 0005 has no place for users at the target: every target is as-is again.
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_column('target_user')
        batch_op.drop_column('source_user')
        batch_op.drop_column('user_link')
    with op.batch_alter_table('issuer', schema=None) as batch_op:
        batch_op.drop_column('user_identifier_claim')
        batch_op.drop_column('user_identifier_systems')
    with op.batch_alter_table('target', schema=None) as batch_op:
        batch_op.drop_column('user_match_identifiers')
        batch_op.drop_column('users')
    with op.batch_alter_table('user_link', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_user_link_target_id'))
    op.drop_table('user_link')
