"""Consent records (contract, "Consent for patient-facing apps"): consents and
denials, the tickets of consent_uris, the server-side state of browser flows,
and the tokens minted under a consent."""
from __future__ import annotations

import time
from datetime import datetime

from sqlalchemy import delete, insert, select, update
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

    def bind(self, ticket_hash: str, session_hash: str, data: dict, expires: int) -> bool:
        """Bind an unbound, unspent, unexpired ticket to a browser session and store the
        session, atomically; False when it is no longer free (another browser took it)."""
        with self.engine.begin() as conn:
            n = conn.execute(update(ConsentTicket).where(
                ConsentTicket.ticket_hash == ticket_hash, ConsentTicket.session_hash.is_(None),
                ConsentTicket.spent.is_(None), ConsentTicket.expires > int(time.time()))
                .values(session_hash=session_hash)).rowcount
            if n != 1:
                conn.rollback()
                return False
            conn.execute(delete(BrowserSession).where(BrowserSession.key == session_hash))
            conn.execute(insert(BrowserSession).values(key=session_hash, data=data, expires=expires))
        return True

    # -- browser sessions -----------------------------------------------------------
    def session(self, key_hash: str):
        """The session's data while it has not expired, else None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(BrowserSession.data).where(
                BrowserSession.key == key_hash, BrowserSession.expires > int(time.time()))).first()
        return row.data if row is not None else None

    def put_session(self, key_hash: str, data: dict, expires: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(BrowserSession).where(
                (BrowserSession.key == key_hash) | (BrowserSession.expires < int(time.time()))))
            conn.execute(insert(BrowserSession).values(key=key_hash, data=data, expires=expires))

    def claim_session(self, key_hash: str) -> bool:
        """Delete the session; True for the one caller that deleted it (a state is used once)."""
        with self.engine.begin() as conn:
            return conn.execute(delete(BrowserSession).where(BrowserSession.key == key_hash)).rowcount == 1

    def rotate_session(self, old_hash: str, new_hash: str, data: dict, expires: int,
                       ticket_hash: str | None = None) -> bool:
        """A new session key (at sign-in), moving the ticket's binding along; False
        when the ticket was meanwhile spent or bound elsewhere."""
        with self.engine.begin() as conn:
            conn.execute(delete(BrowserSession).where(BrowserSession.key == old_hash))
            if ticket_hash is not None:
                n = conn.execute(update(ConsentTicket).where(
                    ConsentTicket.ticket_hash == ticket_hash, ConsentTicket.session_hash == old_hash,
                    ConsentTicket.spent.is_(None)).values(session_hash=new_hash)).rowcount
                if n != 1:
                    return False
            conn.execute(insert(BrowserSession).values(key=new_hash, data=data, expires=expires))
        return True

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

