"""matching, consent, JWT grant, audit fields

Issuers gain identifier systems (matching), Backend Services and sign-in
clients; targets the identifier systems they match on; clients a display name
and redirect URIs; trusts the JWT-grant and consent settings; patient links an
origin (table, matched, blocked); audit records the event, grant, consent,
link, assertion jti, request id and reason. New tables: match_memory,
consent, consent_token, consent_ticket, browser_session.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 13:58:35.675898

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('browser_session',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('expires', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    with op.batch_alter_table('browser_session', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_browser_session_expires'), ['expires'], unique=False)

    op.create_table('consent_token',
    sa.Column('jti', sa.String(length=64), nullable=False),
    sa.Column('consent_id', sa.String(length=64), nullable=False),
    sa.Column('exp', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('jti')
    )
    with op.batch_alter_table('consent_token', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_consent_token_consent_id'), ['consent_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_consent_token_exp'), ['exp'], unique=False)

    op.create_table('match_memory',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('expires', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    with op.batch_alter_table('match_memory', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_match_memory_expires'), ['expires'], unique=False)

    op.create_table('consent',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('issuer', sa.String(length=2048), nullable=False),
    sa.Column('sub', sa.String(length=255), nullable=False),
    sa.Column('signer', sa.String(length=2048), nullable=True),
    sa.Column('source', sa.String(length=2048), nullable=False),
    sa.Column('patient', sa.String(length=255), nullable=False),
    sa.Column('client_id', sa.String(length=255), nullable=False),
    sa.Column('target_id', sa.Integer(), nullable=False),
    sa.Column('scopes', sa.Text(), nullable=False),
    sa.Column('granted', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires', sa.DateTime(timezone=True), nullable=False),
    sa.Column('withdrawn', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['target_id'], ['target.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('consent', schema=None) as batch_op:
        batch_op.create_index('ix_consent_key', ['issuer', 'sub', 'client_id', 'target_id', 'source', 'patient'], unique=False)

    op.create_table('consent_ticket',
    sa.Column('ticket_hash', sa.String(length=64), nullable=False),
    sa.Column('expires', sa.Integer(), nullable=False),
    sa.Column('client_id', sa.String(length=255), nullable=False),
    sa.Column('issuer', sa.String(length=2048), nullable=False),
    sa.Column('sub', sa.String(length=255), nullable=False),
    sa.Column('source', sa.String(length=2048), nullable=False),
    sa.Column('patient', sa.String(length=255), nullable=False),
    sa.Column('target_id', sa.Integer(), nullable=False),
    sa.Column('scopes', sa.Text(), nullable=False),
    sa.Column('session_hash', sa.String(length=64), nullable=True),
    sa.Column('spent', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['target_id'], ['target.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('ticket_hash')
    )
    with op.batch_alter_table('consent_ticket', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_consent_ticket_expires'), ['expires'], unique=False)

    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('event', sa.String(length=32), server_default='exchange', nullable=False))
        batch_op.add_column(sa.Column('grant', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('consent', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('link', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('assertion_jti', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('request_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('reason', sa.Text(), nullable=True))

    with op.batch_alter_table('client', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('redirect_uris', sa.JSON(), server_default='[]', nullable=False))

    with op.batch_alter_table('issuer', schema=None) as batch_op:
        batch_op.add_column(sa.Column('identifier_systems', sa.JSON(), server_default='[]', nullable=False))
        batch_op.add_column(sa.Column('identifier_claim', sa.String(length=64), server_default='patient_identifier', nullable=False))
        batch_op.add_column(sa.Column('fhir_client_id', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('fhir_scope', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('login_client_id', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('login_secret', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('authorization_endpoint', sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column('token_endpoint', sa.String(length=2048), nullable=True))

    with op.batch_alter_table('patient_link', schema=None) as batch_op:
        batch_op.add_column(sa.Column('origin', sa.String(length=16), server_default='table', nullable=False))
        batch_op.add_column(sa.Column('system', sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column('matched_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.alter_column('target_patient',
               existing_type=sa.VARCHAR(length=255),
               nullable=True)

    with op.batch_alter_table('target', schema=None) as batch_op:
        batch_op.add_column(sa.Column('match_identifiers', sa.JSON(), server_default='[]', nullable=False))
        batch_op.add_column(sa.Column('match_ttl_days', sa.Integer(), server_default='30', nullable=False))

    with op.batch_alter_table('trust', schema=None) as batch_op:
        batch_op.add_column(sa.Column('allow_jwt_grant', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('consent', sa.String(length=16), server_default='none', nullable=False))
        batch_op.add_column(sa.Column('consent_max_days', sa.Integer(), server_default='90', nullable=False))
        batch_op.add_column(sa.Column('consent_signer', sa.String(length=16), server_default='patient', nullable=False))



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('trust', schema=None) as batch_op:
        batch_op.drop_column('consent_signer')
        batch_op.drop_column('consent_max_days')
        batch_op.drop_column('consent')
        batch_op.drop_column('allow_jwt_grant')

    with op.batch_alter_table('target', schema=None) as batch_op:
        batch_op.drop_column('match_ttl_days')
        batch_op.drop_column('match_identifiers')

    op.execute("DELETE FROM patient_link WHERE target_patient IS NULL")  # blocks have no place in 0001
    with op.batch_alter_table('patient_link', schema=None) as batch_op:
        batch_op.alter_column('target_patient',
               existing_type=sa.VARCHAR(length=255),
               nullable=False)
        batch_op.drop_column('matched_at')
        batch_op.drop_column('system')
        batch_op.drop_column('origin')

    with op.batch_alter_table('issuer', schema=None) as batch_op:
        batch_op.drop_column('token_endpoint')
        batch_op.drop_column('authorization_endpoint')
        batch_op.drop_column('login_secret')
        batch_op.drop_column('login_client_id')
        batch_op.drop_column('fhir_scope')
        batch_op.drop_column('fhir_client_id')
        batch_op.drop_column('identifier_claim')
        batch_op.drop_column('identifier_systems')

    with op.batch_alter_table('client', schema=None) as batch_op:
        batch_op.drop_column('redirect_uris')
        batch_op.drop_column('name')

    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_column('reason')
        batch_op.drop_column('request_id')
        batch_op.drop_column('assertion_jti')
        batch_op.drop_column('link')
        batch_op.drop_column('consent')
        batch_op.drop_column('grant')
        batch_op.drop_column('event')

    with op.batch_alter_table('consent_ticket', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_consent_ticket_expires'))

    op.drop_table('consent_ticket')
    with op.batch_alter_table('consent', schema=None) as batch_op:
        batch_op.drop_index('ix_consent_key')

    op.drop_table('consent')
    with op.batch_alter_table('match_memory', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_match_memory_expires'))

    op.drop_table('match_memory')
    with op.batch_alter_table('consent_token', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_consent_token_exp'))
        batch_op.drop_index(batch_op.f('ix_consent_token_consent_id'))

    op.drop_table('consent_token')
    with op.batch_alter_table('browser_session', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_browser_session_expires'))

    op.drop_table('browser_session')
