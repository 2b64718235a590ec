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
and a scope comparison over cached parses.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

from .. import scopes
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


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@lru_cache(maxsize=4096)
def parsed(text: str) -> scopes.ScopeSet:
    """Stored consent scopes (written by the service itself) parsed once per text."""
    return scopes.parse(text, strict=False)


def v2(scope_set) -> str:
    return " ".join(s.v2() for s in scope_set.scopes)


def covers(consented: scopes.ScopeSet, grant: scopes.ScopeSet) -> bool:
    """Rule 6 semantics: every granted scope lies within a consented one."""
    return all(any(g.within(c) for c in consented.scopes) for g in grant.scopes)


def union(a: scopes.ScopeSet, b: scopes.ScopeSet) -> scopes.ScopeSet:
    return scopes.parse(v2(a) + " " + v2(b), strict=False)


def consent_key(p, client_id: str, target_id: int, granted: scopes.ScopeSet) -> dict:
    """What a consent is for: the user at the EHR, the launch's source and patient
    (no patient when no patient/ scope is at stake), the app and the target."""
    return {"issuer": p.issuer.url, "sub": p.sub, "client_id": client_id, "target_id": target_id,
            "source": p.source or "", "patient": (p.patient or "") if granted.has_patient else ""}


class ConsentService:
    def __init__(self, settings, store, signin=None):
        self.settings, self.store, self.signin = settings, store, signin
        self.records = store.consents

    def covering(self, presented, client_id: str, target_id: int, granted: scopes.ScopeSet,
                 dry_run: bool = False) -> Covering:
        """The consent this exchange goes through under; else ConsentRequired (with a
        new ticket's consent_uri, except in `explain`, which stores nothing)."""
        key = consent_key(presented, client_id, target_id, granted)
        found = self.records.find_active(**key)
        now = int(time.time())
        consented = None
        if found is not None:
            consent_id, text, expires = found
            if expires > now:
                consented = parsed(text)
                if covers(consented, granted):
                    return Covering(consent_id, expires)
        why = ("The user's consent does not include all the scopes asked for" if consented is not None
               else "This trust requires the user's consent")
        if dry_run:
            raise ConsentRequired(f"{why}; POST /token would answer with a consent_uri to open in the user's "
                                  "browser.", detail="no covering consent (explain creates no ticket)")
        wanted = granted if consented is None else union(consented, granted)
        ticket = secrets.token_urlsafe(32)  # 256 bits
        self.records.create_ticket(dict(key, ticket_hash=digest(ticket), expires=now + TICKET_TTL,
                                        scopes=v2(wanted)))
        raise ConsentRequired(f"{why}: open consent_uri in the user's browser (optionally adding redirect_uri "
                              "and state), then repeat the exchange.",
                              consent_uri=self.settings.issuer + TICKET_PATH + ticket, expires_in=TICKET_TTL,
                              detail="no covering consent; ticket issued")
