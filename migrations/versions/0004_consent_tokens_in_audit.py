"""consent tokens found from the audit: the consent_token table gives way to a partial index

A token minted under a consent is already on record: its audit row holds the
token's ``jti`` and the ``consent`` id. A partial index on ``audit_event (jti)``
for rows with a consent lets introspection follow a token to its consent, and
costs an exchange without consent nothing; the separate ``consent_token`` row
(and its three indexes) written with every such exchange goes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 19:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

WITH_CONSENT = sa.text("consent IS NOT NULL")


def upgrade() -> None:
    # Every consent_token row has its audit row (the same transaction wrote both).
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.create_index('ix_audit_event_consent_jti', ['jti'], unique=False,
                              sqlite_where=WITH_CONSENT, postgresql_where=WITH_CONSENT)
    with op.batch_alter_table('consent_token', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_consent_token_exp'))
        batch_op.drop_index(batch_op.f('ix_consent_token_consent_id'))
    op.drop_table('consent_token')


def downgrade() -> None:
    op.create_table('consent_token',
    sa.Column('jti', sa.String(length=64), nullable=False),
    sa.Column('consent_id', sa.String(length=64), nullable=False),
    sa.Column('exp', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('jti')
    )
    with op.batch_alter_table('consent_token', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_consent_token_consent_id'), ['consent_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_consent_token_exp'), ['exp'], unique=False)
    # The audit knows each token's consent but not its expiry: keep them all (the
    # service prunes consent_token rows after exp; these stay until pruned by hand).
    op.execute("INSERT INTO consent_token (jti, consent_id, exp) SELECT jti, consent, 2147483647 "
               "FROM audit_event WHERE consent IS NOT NULL AND jti IS NOT NULL AND outcome = 'granted'")
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_event_consent_jti', sqlite_where=WITH_CONSENT,
                            postgresql_where=WITH_CONSENT)
