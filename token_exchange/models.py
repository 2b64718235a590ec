"""The service's data. Created only by the Alembic migrations in migrations/."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint, false as sa_false, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

URL = String(2048)
ID = String(255)


class Base(DeclarativeBase):
    pass


class Issuer(Base):
    """A trusted source authorization server (an EHR)."""
    __tablename__ = "issuer"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(URL, unique=True)  # exact `iss`
    jwks_uri: Mapped[str] = mapped_column(URL)
    algs: Mapped[list] = mapped_column(JSON)
    sources: Mapped[list] = mapped_column(JSON)  # FHIR base URLs it may vouch for
    audiences: Mapped[list] = mapped_column(JSON)  # extra accepted access-token audiences
    patient_claim: Mapped[str] = mapped_column(String(64), default="patient")
    source_claim: Mapped[str] = mapped_column(String(64), default="source")
    introspection_endpoint: Mapped[str | None] = mapped_column(URL)
    introspection_client_id: Mapped[str | None] = mapped_column(ID)
    introspection_secret: Mapped[str | None] = mapped_column(Text)  # sealed when a key secret is set
    # Patient matching: the identifier systems it may vouch for, and the claim carrying them.
    identifier_systems: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    identifier_claim: Mapped[str] = mapped_column(String(64), default="patient_identifier",
                                                  server_default="patient_identifier")
    # SMART Backend Services at this EHR (reading the source Patient), and the
    # consent sign-in (OpenID Connect): the service's own client ids there.
    # The user at the target: the identifier systems it may vouch for about its users, and their claim.
    user_identifier_systems: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    user_identifier_claim: Mapped[str] = mapped_column(String(64), default="fhirUser_identifier",
                                                       server_default="fhirUser_identifier")
    fhir_client_id: Mapped[str | None] = mapped_column(ID)
    fhir_scope: Mapped[str | None] = mapped_column(String(255))
    login_client_id: Mapped[str | None] = mapped_column(ID)
    login_secret: Mapped[str | None] = mapped_column(Text)  # sealed when a key secret is set
    authorization_endpoint: Mapped[str | None] = mapped_column(URL)
    token_endpoint: Mapped[str | None] = mapped_column(URL)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Target(Base):
    """A FHIR server that accepts minted tokens; its base URL is their `aud`."""
    __tablename__ = "target"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_url: Mapped[str] = mapped_column(URL, unique=True)
    name: Mapped[str | None] = mapped_column(ID, unique=True)
    max_ttl: Mapped[int | None] = mapped_column(Integer)
    secret_salt: Mapped[str | None] = mapped_column(String(64))
    secret_hash: Mapped[str | None] = mapped_column(String(128))
    # Patient matching: identifier systems that name one patient here, and how long a match holds.
    match_identifiers: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    match_ttl_days: Mapped[int] = mapped_column(Integer, default=30, server_default="30")
    # The user at the target: as-is (fhirUser passed on) or mapped; the systems naming one user here.
    users: Mapped[str] = mapped_column(String(16), default="as-is", server_default="as-is")
    user_match_identifiers: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Client(Base):
    """A vendor backend that asks for exchanges."""
    __tablename__ = "client"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[str] = mapped_column(ID, unique=True)
    auth_method: Mapped[str] = mapped_column(String(32))  # client_secret | private_key_jwt
    secret_salt: Mapped[str | None] = mapped_column(String(64))
    secret_hash: Mapped[str | None] = mapped_column(String(128))
    jwks: Mapped[dict | None] = mapped_column(JSON)
    jwks_uri: Mapped[str | None] = mapped_column(URL)
    name: Mapped[str | None] = mapped_column(ID)  # shown on the consent page
    redirect_uris: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    # `client disable`: refused at every endpoint (401 invalid_client) until `client enable`.
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # RFC 9449 §5.2 dpop_bound_access_tokens: its requests need a DPoP proof.
    require_dpop: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Trust(Base):
    """Client C may exchange tokens from issuer I, issued to upstream client U, for target T."""
    __tablename__ = "trust"
    __table_args__ = (UniqueConstraint("client_id", "issuer_id", "target_id", name="uq_trust"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("client.id", ondelete="CASCADE"))
    issuer_id: Mapped[int] = mapped_column(ForeignKey("issuer.id", ondelete="CASCADE"))
    target_id: Mapped[int] = mapped_column(ForeignKey("target.id", ondelete="CASCADE"))
    scopes: Mapped[str] = mapped_column(Text)
    upstream_client_id: Mapped[str] = mapped_column(ID)
    max_ttl: Mapped[int | None] = mapped_column(Integer)
    allow_id_token: Mapped[bool] = mapped_column(Boolean, default=False)
    allow_jwt_grant: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    consent: Mapped[str] = mapped_column(String(16), default="none", server_default="none")  # none | required
    consent_max_days: Mapped[int] = mapped_column(Integer, default=90, server_default="90")
    consent_signer: Mapped[str] = mapped_column(String(16), default="patient", server_default="patient")
    require_dpop: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())  # DPoP proof needed
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PatientLink(Base):
    """(source FHIR base, source patient id) -> (target, target patient id).

    origin: ``table`` (an admin's), ``matched`` (found at the target by an
    identifier, with the system that matched and when), or ``blocked`` (an
    admin's "never match": no target patient)."""
    __tablename__ = "patient_link"
    __table_args__ = (UniqueConstraint("source", "patient", "target_id", name="uq_patient_link"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(URL)
    patient: Mapped[str] = mapped_column(ID)
    target_id: Mapped[int] = mapped_column(ForeignKey("target.id", ondelete="CASCADE"), index=True)
    target_patient: Mapped[str | None] = mapped_column(ID)
    origin: Mapped[str] = mapped_column(String(16), default="table", server_default="table")
    system: Mapped[str | None] = mapped_column(URL)
    matched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class UserLink(Base):
    """(source user URL, target) -> the target's reference for that user (``Practitioner/789``).

    origin: ``table`` (an admin's), ``matched`` (found at the target by an identifier,
    with the system that matched and when), or ``blocked`` (never match: no user)."""
    __tablename__ = "user_link"
    __table_args__ = (UniqueConstraint("user", "target_id", name="uq_user_link"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(URL)
    target_id: Mapped[int] = mapped_column(ForeignKey("target.id", ondelete="CASCADE"), index=True)
    target_user: Mapped[str | None] = mapped_column(String(320))
    origin: Mapped[str] = mapped_column(String(16), default="table", server_default="table")
    system: Mapped[str | None] = mapped_column(URL)
    matched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class MatchMemory(Base):
    """A match that found no patient or several, remembered for 10 minutes by every
    instance: key = SHA-256 of (source, patient, target, the usable identifiers)."""
    __tablename__ = "match_memory"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16))  # none | ambiguous
    expires: Mapped[int] = mapped_column(Integer, index=True)


class SigningKey(Base):
    """The service's own signing keys: staged -> active -> retired."""
    __tablename__ = "signing_key"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kid: Mapped[str] = mapped_column(String(64), unique=True)
    alg: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)  # staged | active | retired
    private_key: Mapped[str] = mapped_column(Text)  # PEM, sealed when a key secret is set
    public_jwk: Mapped[dict] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    activated: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Every exchange decision, granted or refused. Never a token or a secret."""
    __tablename__ = "audit_event"
    # ix_audit_event_consent_jti: the tokens minted under a consent, by jti, so that
    # introspection follows a token to its consent (withdrawal revokes); partial, so
    # an exchange without consent pays nothing for it.
    # ix_audit_event_dpop_proof: a DPoP proof's jti is spent by the record of the request
    # that sent it (unique per proof key): one insert, no second table; partial, so a
    # bearer exchange pays nothing for it.
    __table_args__ = (Index("ix_audit_event_time", "time"),
                      Index("ix_audit_event_consent_jti", "jti", sqlite_where=text("consent IS NOT NULL"),
                            postgresql_where=text("consent IS NOT NULL")),
                      Index("ix_audit_event_dpop_proof", "dpop_jkt", "dpop_jti", unique=True,
                            sqlite_where=text("dpop_jti IS NOT NULL"), postgresql_where=text("dpop_jti IS NOT NULL")))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    client_id: Mapped[str | None] = mapped_column(ID)
    issuer: Mapped[str | None] = mapped_column(URL)
    subject: Mapped[str | None] = mapped_column(ID)
    target: Mapped[str | None] = mapped_column(URL)
    source_patient: Mapped[str | None] = mapped_column(ID)
    target_patient: Mapped[str | None] = mapped_column(ID)
    scope_requested: Mapped[str | None] = mapped_column(Text)
    scope_granted: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16))  # granted | refused
    error: Mapped[str | None] = mapped_column(String(64))
    jti: Mapped[str | None] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32), default="exchange", server_default="exchange")
    grant: Mapped[str | None] = mapped_column(String(32))  # token-exchange | jwt-bearer
    consent: Mapped[str | None] = mapped_column(String(64))  # the consent id
    link: Mapped[str | None] = mapped_column(String(16))  # how the patient was mapped
    assertion_jti: Mapped[str | None] = mapped_column(String(255))
    request_id: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)  # internal reason of a refusal; never a token
    user_link: Mapped[str | None] = mapped_column(String(16))  # how the user was mapped
    source_user: Mapped[str | None] = mapped_column(URL)  # the user's URL at the source
    target_user: Mapped[str | None] = mapped_column(String(320))  # the target's reference (Practitioner/789)
    dpop_jkt: Mapped[str | None] = mapped_column(String(64))  # the DPoP proof key's thumbprint (RFC 7638)
    dpop_jti: Mapped[str | None] = mapped_column(String(255))  # the proof's jti, spent by this record


class AdminEvent(Base):
    """Every change made with the CLI: who, what, when."""
    __tablename__ = "admin_event"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(ID)
    action: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)


class Revocation(Base):
    """A minted token revoked before its expiry (RFC 7009); pruned after `exp`."""
    __tablename__ = "revocation"
    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    exp: Mapped[int] = mapped_column(Integer, index=True)


class RevocationRule(Base):
    """`token revoke` (and the removals that revoke): every minted token it covers and
    issued before ``time`` introspects inactive. One row per command, not per token;
    the fields its kind names (``revocation.KINDS``) are set, the others null.
    Names are as the tokens carry them (client_id, the issuer URL as ``idp``, the
    target's base URL as ``aud``, the user's ``fhirUser``), so a rule outlives the
    rows it was made from."""
    __tablename__ = "revocation_rule"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # client | trust | patient | user
    client_id: Mapped[str | None] = mapped_column(ID)
    issuer: Mapped[str | None] = mapped_column(URL)
    target: Mapped[str | None] = mapped_column(URL)
    source: Mapped[str | None] = mapped_column(URL)
    patient: Mapped[str | None] = mapped_column(ID)
    fhir_user: Mapped[str | None] = mapped_column(URL)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class AssertionJti(Base):
    """Client-assertion `jti`s spent while unexpired (RFC 7523 §3 replay defence)."""
    __tablename__ = "assertion_jti"
    client_id: Mapped[str] = mapped_column(ID, primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    exp: Mapped[int] = mapped_column(Integer, index=True)


class Generation(Base):
    """One row: bumped by every CLI change so running workers reload within seconds."""
    __tablename__ = "generation"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


class Consent(Base):
    """A user's approval that a client reach a target for a patient, with scopes,
    until it expires or is withdrawn; or (decision ``denied``) a refusal, kept for
    the record and never active (``withdrawn`` = the time of the decision)."""
    __tablename__ = "consent"
    __table_args__ = (Index("ix_consent_key", "issuer", "sub", "client_id", "target_id", "source", "patient"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    issuer: Mapped[str] = mapped_column(URL)
    sub: Mapped[str] = mapped_column(ID)
    signer: Mapped[str | None] = mapped_column(URL)  # the signer's fhirUser
    source: Mapped[str] = mapped_column(URL, default="")  # "" when none
    patient: Mapped[str] = mapped_column(ID, default="")  # "" for user-only grants
    client_id: Mapped[str] = mapped_column(ID)
    target_id: Mapped[int] = mapped_column(ForeignKey("target.id", ondelete="CASCADE"))
    scopes: Mapped[str] = mapped_column(Text)
    granted: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    withdrawn: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    decision: Mapped[str] = mapped_column(String(16), default="granted", server_default="granted")  # granted | denied


class ConsentTicket(Base):
    """A consent_uri's ticket: only its SHA-256 is stored; single use, 10 minutes,
    bound to what the exchange asked for."""
    __tablename__ = "consent_ticket"
    ticket_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires: Mapped[int] = mapped_column(Integer, index=True)
    client_id: Mapped[str] = mapped_column(ID)
    issuer: Mapped[str] = mapped_column(URL)
    sub: Mapped[str] = mapped_column(ID)
    source: Mapped[str] = mapped_column(URL, default="")
    patient: Mapped[str] = mapped_column(ID, default="")
    target_id: Mapped[int] = mapped_column(ForeignKey("target.id", ondelete="CASCADE"))
    scopes: Mapped[str] = mapped_column(Text)
    session_hash: Mapped[str | None] = mapped_column(String(64))  # the browser session it is bound to
    spent: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BrowserSession(Base):
    """A signed-in browser's session at the consent pages (who signed in, the ticket,
    the CSRF token), keyed by the SHA-256 of a random cookie, so any instance can
    serve any step; stored only once the EHR's answer is verified. Also the markers
    spending a sign-in's state and the day's key of the sealed sign-in cookies
    (consent/state.py)."""
    __tablename__ = "browser_session"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[dict] = mapped_column(JSON)
    expires: Mapped[int] = mapped_column(Integer, index=True)
