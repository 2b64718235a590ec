"""Admin revocation rules (`token revoke`, and the removals that revoke): which minted
tokens a rule covers. Pure: the rules come with the trust snapshot (``config.Config``),
the claims from a verified token, and the one fact a token does not carry (whose
source patient it was minted for) from a callable the caller hands in.

A rule covers a token issued before the rule's time (``iat`` < time: a token minted
in the same second as the command is covered too) that matches on

- ``client``: ``client_id``;
- ``trust``: ``client_id``, ``idp`` (the issuer) and ``aud`` (the target);
- ``patient``: the source patient: the token carries the *target* patient id, so
  the source patient and the issuer come from the token's audit record (by its
  ``jti``), and the rule's source FHIR base is matched through the issuers that
  vouch for it; ``aud`` too when the rule names a target;
- ``user``: the user's FHIR URL at the source: the token's ``fhirUser`` at an as-is
  target; at a ``mapped`` target the token names the target's own URL, so the source
  user comes from the token's audit record (``source_user``); ``aud`` too when the rule
  names a target (`user-link remove`).

Single tokens (`token revoke --jti`, POST /revoke) are revoked by jti, not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

KINDS = ("client", "trust", "patient", "user")


@dataclass(frozen=True)
class Rule:
    kind: str
    before: float  # epoch seconds: the rule's time
    client_id: str | None = None
    issuer: str | None = None
    target: str | None = None  # a base URL, as `aud`
    source: str | None = None
    patient: str | None = None
    fhir_user: str | None = None


class RuleSet:
    """The rules as introspection asks them: the latest time per client, per trust and
    per user (a dictionary look-up each), and the patient rules, whose issuers (those
    vouching for the rule's source) are resolved when the snapshot is built."""

    def __init__(self, rules=(), issuers: dict | None = None):
        self.by_client: dict = {}
        self.by_trust: dict = {}
        self.by_user: dict = {}  # fhirUser -> the latest time of a rule naming no target
        self.users: list = []  # (before, fhir_user, target or None): every user rule
        self.patients: list = []  # (before, patient, target or None, frozenset of issuer URLs)
        vouching: dict = {}
        for url, cfg in (issuers or {}).items():
            for source in cfg.sources:
                vouching.setdefault(source, set()).add(url)
        for r in rules:
            if r.kind == "client":
                _latest(self.by_client, r.client_id, r.before)
            elif r.kind == "trust":
                _latest(self.by_trust, (r.client_id, r.issuer, r.target), r.before)
            elif r.kind == "user":
                if r.target is None:
                    _latest(self.by_user, r.fhir_user, r.before)
                self.users.append((r.before, r.fhir_user, r.target))
            elif r.kind == "patient":
                self.patients.append((r.before, r.patient, r.target, frozenset(vouching.get(r.source, ()))))

    def __len__(self) -> int:
        return len(self.by_client) + len(self.by_trust) + len(self.users) + len(self.patients)

    def covers(self, claims: dict, origin: Callable[[], tuple | None]) -> bool:
        """Whether a rule covers this token. ``origin()`` -> (issuer URL, source patient,
        source user) from the token's audit record, or None: asked only when a patient or
        user rule could cover the token (its target, and a time after the token's iat)."""
        iat = claims.get("iat")
        if not isinstance(iat, (int, float)):
            return True  # never minted here without one; verify_minted requires it
        client, aud = claims.get("client_id"), claims.get("aud")
        if iat < self.by_client.get(client, 0) or iat < self.by_trust.get((client, claims.get("idp"), aud), 0):
            return True
        user = claims.get("fhirUser")
        if user is not None and iat < self.by_user.get(user, 0):
            return True
        users = [u for u in self.users if iat < u[0] and u[2] in (None, aud)]
        if any(u[1] == user for u in users):
            return True
        candidates = [p for p in self.patients if iat < p[0] and p[2] in (None, aud)]
        if not candidates and not users:
            return False
        found = origin()
        if found is None:
            return False
        issuer, source_patient, source_user = found
        return any(source_patient == patient and issuer in issuers for _, patient, _, issuers in candidates) \
            or (source_user is not None and any(u[1] == source_user for u in users))


def _latest(table: dict, key, before: float) -> None:
    if before > table.get(key, 0):
        table[key] = before
