"""The consent check of an exchange, and the tickets of consent_uris.

Contract, "Consent for patient-facing apps": a trust with ``--consent required``
lets an exchange through only when one active consent with the same issuer,
``sub``, source, patient (none for user-only grants), client and target has
scopes that include the grant (rule 6 semantics). Otherwise the exchange is
refused with ``consent_required`` and a ``consent_uri`` holding a new ticket:
256 random bits, of which only the SHA-256 is stored, valid 10 minutes, single
use, bound to that key and to the scopes to approve (the grant, joined with
what an existing consent already allows).

On the hot path the check is one indexed read (``ConsentQueries.find_active``)
and a scope comparison (``ScopeSet.covers``) over memoised parses. The rules of
the consent pages live here too: who may sign (``check_signer``) and the records
a decision stores (``consent_record``, ``ConsentService.decide``).
"""
from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .. import audit, scopes
from ..errors import ConsentRequired

TICKET_TTL = 600  # seconds: the consent_uri's ticket
TICKET_PATH = "/consent/t/"


@dataclass(frozen=True)
class Covering:
    """The consent an exchange goes through under."""
    id: str
    expires: int  # epoch seconds

    @property
    def expires_iso(self) -> str:
        return datetime.fromtimestamp(self.expires, timezone.utc).isoformat()


class WrongSigner(Exception):
    """The person who signed in may not sign this consent: ``who`` names who must,
    "user" (the user the app's tokens name) or "patient" (the patient themself)."""

    def __init__(self, who: str, detail: str):
        super().__init__(detail)
        self.who, self.detail = who, detail


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def consent_key(presented, client_id: str, target_id: int, granted: scopes.ScopeSet) -> dict:
    """What a consent is for: the user at the EHR, the launch's source and patient
    (no patient when no patient/ scope is at stake), the app and the target."""
    return {"issuer": presented.issuer.url, "sub": presented.sub, "client_id": client_id, "target_id": target_id,
            "source": presented.source or "", "patient": (presented.patient or "") if granted.has_patient else ""}


def check_signer(ticket, user: dict, cfg) -> None:
    """Who may sign: the user the app's tokens name (`sub`) and, with
    --consent-signer patient, the patient themself (fhirUser {source}/Patient/{patient});
    else WrongSigner. ``ticket`` is the ticket's row, ``user`` who signed in at the
    EHR (issuer, sub, fhirUser), ``cfg`` the configuration snapshot."""
    if user["issuer"] != ticket.issuer or user["sub"] != ticket.sub:
        raise WrongSigner("user", "signed-in sub differs from the ticket's")
    trust = cfg.trusts.get((ticket.client_id, ticket.issuer, ticket.target_id))
    if trust is None or trust.consent_signer != "patient":
        return
    fhir_user = user.get("fhirUser") or ""
    if ticket.patient:
        ok = fhir_user == f"{ticket.source}/Patient/{ticket.patient}"
    else:  # no patient at stake (user/ scopes only): still a patient, on the source
        sources = (ticket.source,) if ticket.source else cfg.issuers[ticket.issuer].sources
        ok = any(fhir_user.startswith(f"{s}/Patient/") and "/" not in fhir_user[len(s) + 9:] for s in sources)
    if not ok:
        raise WrongSigner("patient", "signer is not the patient")


def consent_record(ticket, signer: str | None, granted: bool, days: int) -> dict:
    """The consent (or, not granted, the denial) the user's answer on a ticket records:
    the ticket's key and scopes, for ``days`` from now; a denial is withdrawn at once."""
    now = datetime.now(timezone.utc)
    return {"id": secrets.token_hex(16), "issuer": ticket.issuer, "sub": ticket.sub, "signer": signer,
            "source": ticket.source, "patient": ticket.patient, "client_id": ticket.client_id,
            "target_id": ticket.target_id, "scopes": ticket.scopes, "granted": now,
            "expires": now + timedelta(days=days) if granted else now,
            "withdrawn": None if granted else now, "decision": "granted" if granted else "denied"}


class ConsentService:
    def __init__(self, settings, store, signin=None, states=None):
        """``signin`` (signin.SignIn) and ``states`` (state.SignInStates): the consent
        pages' sign-in at the EHR and its sealed state."""
        self.settings, self.store, self.signin, self.states = settings, store, signin, states
        self.records = store.consents

    def covering(self, presented, client_id: str, target_id: int, granted: scopes.ScopeSet,
                 dry_run: bool = False) -> Covering:
        """The consent an exchange of ``presented`` (subject.Presented) by ``client_id``
        for target ``target_id``, granting ``granted``, goes through under; else
        ConsentRequired (with a new ticket's consent_uri, except in `explain`, which
        stores nothing)."""
        key = consent_key(presented, client_id, target_id, granted)
        found = self.records.find_active(**key)
        now = int(time.time())
        consented = None
        if found is not None:
            consent_id, text, expires = found
            if expires > now:
                consented = scopes.parse_claim(text)  # written by this service: trusted, memoised
                if consented.covers(granted):
                    return Covering(consent_id, expires)
        why = ("The user's consent does not include all the scopes asked for" if consented is not None
               else "This trust requires the user's consent")
        if dry_run:
            raise ConsentRequired(f"{why}; POST /token would answer with a consent_uri to open in the user's "
                                  "browser.", detail="no covering consent (explain creates no ticket)")
        wanted = granted if consented is None else consented.union(granted)
        ticket = secrets.token_urlsafe(32)  # 256 bits
        self.records.create_ticket(dict(key, ticket_hash=digest(ticket), expires=now + TICKET_TTL,
                                        scopes=wanted.format(v1=False)))
        raise ConsentRequired(f"{why}: open consent_uri in the user's browser (optionally adding redirect_uri "
                              "and state), then repeat the exchange.",
                              consent_uri=self.settings.issuer + TICKET_PATH + ticket, expires_in=TICKET_TTL,
                              detail="no covering consent; ticket issued")

    def decide(self, ticket, session_hash: str, signer: str | None, granted: bool, days: int, target_url: str,
               request_id: str | None) -> str | None:
        """Record the user's answer on the ticket (a consent, or a denial) with its audit
        record, spending the ticket; the consent's id, or None when the ticket was spent
        meanwhile (nothing recorded)."""
        consent = consent_record(ticket, signer, granted, days)
        record = audit.consent_decision(ticket, granted, consent["id"], target_url, request_id)
        if self.records.decide(ticket.ticket_hash, session_hash, consent, record) is None:
            return None
        return consent["id"]
