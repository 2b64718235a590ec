"""Consent records (contract, "Consent for patient-facing apps"): consents and
denials, the tickets of consent_uris, the server-side state of browser flows,
and the tokens minted under a consent."""
from __future__ import annotations

import time
from datetime import datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import audit as audit_records
from ..clock import aware
from ..models import AdminEvent, AuditEvent, BrowserSession, Consent, ConsentTicket, Target
from .hotpath import HotPath


class ConsentQueries:
    """The consent flow's records (contract, "Consent for patient-facing apps"):
    consents (and denials), the tickets of consent_uris, the server-side state of
    browser flows, and the tokens minted under a consent. Everything a flow needs
    is here, so any instance can finish a flow another started."""

    def __init__(self, engine, hot: HotPath):
        self.engine, self._hot = engine, hot

    # -- the exchange (hot path) -------------------------------------------------
    def find_active(self, issuer: str, sub: str, client_id: str, target_id: int, source: str, patient: str):
        """(id, scopes, expires epoch seconds) of the key's active consent, or None:
        one read on the ix_consent_key index."""
        row = self._hot.run(self._hot.find_consent, {
            "issuer": issuer, "sub": sub, "client_id": client_id, "target_id": target_id, "source": source,
            "patient": patient}, fetch=True)
        if row is None:
            return None
        return row[0], row[1], int(aware(self._hot.time_result(row[2])).timestamp())

    def lapsed(self, jti: str, now: datetime) -> bool:
        """True when the token was minted under a consent that is now withdrawn or expired."""
        with self.engine.connect() as conn:
            row = conn.execute(select(Consent.withdrawn, Consent.expires)
                               .join_from(AuditEvent, Consent, AuditEvent.consent == Consent.id)
                               .where(AuditEvent.jti == jti, AuditEvent.consent.is_not(None))).first()
        return row is not None and (row.withdrawn is not None or aware(row.expires) <= now)

    # -- tickets ------------------------------------------------------------------
    def create_ticket(self, ticket: dict) -> None:
        """Store a ticket (its hash, never the ticket); prune what has lapsed meanwhile."""
        now = int(time.time())
        with self.engine.begin() as conn:
            conn.execute(delete(ConsentTicket).where(ConsentTicket.expires < now))
            conn.execute(delete(BrowserSession).where(BrowserSession.expires < now))
            conn.execute(insert(ConsentTicket).values(**ticket))

    def ticket(self, ticket_hash: str):
        with self.engine.connect() as conn:
            return conn.execute(select(ConsentTicket).where(ConsentTicket.ticket_hash == ticket_hash)).first()

    def bind(self, ticket_hash: str, session_hash: str) -> bool:
        """Bind an unbound, unspent, unexpired ticket to a browser (the SHA-256 of its flow
        cookie); False when it is no longer free (another browser took it). Nothing else
        is stored: the sign-in's state travels sealed in that cookie (consent/state.py)."""
        with self.engine.begin() as conn:
            return conn.execute(update(ConsentTicket).where(
                ConsentTicket.ticket_hash == ticket_hash, ConsentTicket.session_hash.is_(None),
                ConsentTicket.spent.is_(None), ConsentTicket.expires > int(time.time()))
                .values(session_hash=session_hash)).rowcount == 1

    def rebind(self, ticket_hash: str, old_hash: str, new_hash: str) -> bool:
        """Move an unspent ticket's binding to this browser's new flow cookie (a sign-in
        started again), dropping the session the old cookie had; False when the ticket is
        spent or bound elsewhere meanwhile."""
        with self.engine.begin() as conn:
            n = conn.execute(update(ConsentTicket).where(
                ConsentTicket.ticket_hash == ticket_hash, ConsentTicket.session_hash == old_hash,
                ConsentTicket.spent.is_(None), ConsentTicket.expires > int(time.time()))
                .values(session_hash=new_hash)).rowcount
            if n == 1:
                conn.execute(delete(BrowserSession).where(BrowserSession.key == old_hash))
        return n == 1

    # -- browser sessions -----------------------------------------------------------
    def session(self, key_hash: str):
        """The session's data while it has not expired, else None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(BrowserSession.data).where(
                BrowserSession.key == key_hash, BrowserSession.expires > int(time.time()))).first()
        return row.data if row is not None else None

    def claim_session(self, key_hash: str) -> bool:
        """Delete the session; True for the one caller that deleted it."""
        with self.engine.begin() as conn:
            return conn.execute(delete(BrowserSession).where(BrowserSession.key == key_hash)).rowcount == 1

    def signin_spent(self, spent_key: str) -> bool:
        """True when the sign-in whose state this marker names was completed already."""
        with self.engine.connect() as conn:
            return conn.execute(select(BrowserSession.key).where(BrowserSession.key == spent_key)).first() is not None

    def complete_signin(self, spent_key: str, spent_until: int, new_hash: str, data: dict, expires: int,
                        ticket_hash: str | None = None, old_hash: str | None = None) -> bool:
        """The EHR's answer verified: in one transaction, spend the sign-in's state (a
        marker kept while its cookie could be replayed), move the ticket's binding from
        the sign-in cookie to the new session cookie, and store the session; prune what
        has lapsed. False, storing nothing, when the state was spent already (the marker
        is the primary key: of two concurrent callbacks one wins) or the ticket was
        meanwhile spent or bound elsewhere."""
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(BrowserSession).where(BrowserSession.expires < int(time.time())))
                conn.execute(insert(BrowserSession).values(key=spent_key, data={"purpose": "spent"},
                                                           expires=spent_until))
                if ticket_hash is not None:
                    n = conn.execute(update(ConsentTicket).where(
                        ConsentTicket.ticket_hash == ticket_hash, ConsentTicket.session_hash == old_hash,
                        ConsentTicket.spent.is_(None)).values(session_hash=new_hash)).rowcount
                    if n != 1:
                        conn.rollback()
                        return False
                conn.execute(insert(BrowserSession).values(key=new_hash, data=data, expires=expires))
        except IntegrityError:
            return False
        return True

    def browser_key(self, name: str) -> str | None:
        """A stored cookie key (consent/state.py), sealed as stored, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(BrowserSession.data).where(
                BrowserSession.key == name, BrowserSession.expires > int(time.time()))).first()
        return row.data.get("secret") if row is not None else None

    def add_browser_key(self, name: str, sealed: str, expires: int) -> str | None:
        """Store a cookie key unless another instance stored one under this name first;
        the one stored."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(BrowserSession).values(key=name, data={"purpose": "key", "secret": sealed},
                                                           expires=expires))
        except IntegrityError:
            pass
        return self.browser_key(name)

    # -- decisions -------------------------------------------------------------------
    def decide(self, ticket_hash: str, session_hash: str, consent: dict, audit: dict) -> list | None:
        """Spend the ticket and record the decision (a consent, or a denial) with its
        audit event, in one transaction. A granted consent withdraws the key's older
        ones (each with its own audit event). Returns the ids withdrawn, or None when
        the ticket was already spent, expired or bound elsewhere (nothing recorded)."""
        now = consent["granted"]
        with self.engine.begin() as conn:
            n = conn.execute(update(ConsentTicket).where(
                ConsentTicket.ticket_hash == ticket_hash, ConsentTicket.session_hash == session_hash,
                ConsentTicket.spent.is_(None), ConsentTicket.expires > int(now.timestamp()))
                .values(spent=now)).rowcount
            if n != 1:
                conn.rollback()
                return None
            replaced = []
            if consent["decision"] == "granted":
                key = [getattr(Consent, k) == consent[k]
                       for k in ("issuer", "sub", "client_id", "target_id", "source", "patient")]
                replaced = conn.execute(select(Consent.id, Consent.scopes).where(
                    *key, Consent.withdrawn.is_(None))).all()
                if replaced:
                    conn.execute(update(Consent).where(Consent.id.in_([r.id for r in replaced]))
                                 .values(withdrawn=now))
            conn.execute(insert(Consent).values(**consent))
            for old in replaced:
                conn.execute(insert(AuditEvent).values(**audit_records.withdrawn(
                    audit, old.id, old.scopes, reason=f"replaced by consent {consent['id']}")))
            conn.execute(insert(AuditEvent).values(**audit))
        return [r.id for r in replaced]

    def withdraw(self, consent_id: str, audit: dict, issuer: str | None = None, sub: str | None = None,
                 admin: tuple | None = None):
        """Withdraw an active consent (the user's own when issuer and sub are given) and
        record it (and, by an admin, the admin event: (actor, action, detail)); the
        consent row, or None when there is no such active consent."""
        now = audit["time"]
        with self.engine.begin() as conn:
            q = (select(Consent.__table__, Target.base_url.label("target_url"))
                 .join(Target, Consent.target_id == Target.id)
                 .where(Consent.id == consent_id, Consent.withdrawn.is_(None), Consent.decision == "granted"))
            if issuer is not None:
                q = q.where(Consent.issuer == issuer, Consent.sub == sub)
            row = conn.execute(q).first()
            if row is None:
                return None
            n = conn.execute(update(Consent).where(Consent.id == consent_id, Consent.withdrawn.is_(None))
                             .values(withdrawn=now)).rowcount
            if n != 1:
                conn.rollback()
                return None
            conn.execute(insert(AuditEvent).values(**audit_records.withdrawn(
                audit, row.id, row.scopes, client_id=row.client_id, issuer=row.issuer, subject=row.sub,
                target=row.target_url, source_patient=row.patient or None)))
            if admin is not None:
                actor, action, detail = admin
                conn.execute(insert(AdminEvent).values(**audit_records.admin(actor, action, detail, time=now)))
        return row

    # -- reading -----------------------------------------------------------------------
    def _select(self):
        return select(Consent, Target.base_url.label("target_url"), Target.name.label("target_name")).join(
            Target, Consent.target_id == Target.id)

    def active_for(self, issuer: str, sub: str, now: datetime) -> list:
        """The user's active consents (the ix_consent_key index: issuer, sub first)."""
        q = self._select().where(Consent.issuer == issuer, Consent.sub == sub, Consent.withdrawn.is_(None),
                                 Consent.expires > now).order_by(Consent.granted.desc())
        with Session(self.engine) as s:
            return list(s.execute(q))

    def listed(self, client_id: str | None = None, target_id: int | None = None, denials: bool = False) -> list:
        q = self._select().order_by(Consent.granted, Consent.id)
        if not denials:
            q = q.where(Consent.decision == "granted")
        if client_id is not None:
            q = q.where(Consent.client_id == client_id)
        if target_id is not None:
            q = q.where(Consent.target_id == target_id)
        with Session(self.engine) as s:
            return list(s.execute(q))

    def get(self, consent_id: str):
        with Session(self.engine) as s:
            return s.execute(self._select().where(Consent.id == consent_id)).first()

