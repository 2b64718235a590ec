"""Patient mapping onto the target (contract rule 7 and "Patient matching at the target").

A stored link answers with no outbound call. Where none exists and the target is
set up for matching, the patient is looked for at the target by an identifier
both sides trust (see ``Matcher``), and linked only on exactly one match.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone


@dataclass(frozen=True)
class Mapped:
    """How the patient was mapped: ``target_patient`` (None: no patient scopes), the
    audit's ``link`` value, and a sentence for `explain`."""
    target_patient: str | None
    origin: str | None  # table | matched | matched-stored | none | ambiguous | unavailable
    explain: str


class PatientMapper:
    def __init__(self, store, matcher=None):
        self.store = store
        self.matcher = matcher

    def map(self, grant, dry_run: bool = False) -> Mapped:
        p, target = grant.presented, grant.target
        row = self.store.find_link(p.source, p.patient, target.id)
        if row is not None:
            target_patient, origin, matched_at = row
            if origin == "table":
                return Mapped(target_patient, "table", "a table link")
            if origin == "blocked":
                return Mapped(None, "none", "an admin blocked matching this patient at this target")
            if not _expired(matched_at, target.match_ttl_days):
                return Mapped(target_patient, "matched-stored", "a link matched earlier")
        if self.matcher is None or not target.match_identifiers:
            return Mapped(None, "none", "no patient link maps it to this target, and the target is not set up "
                                        "for matching")
        return self.matcher.match(grant, stale=row is not None, dry_run=dry_run)


def _expired(matched_at, ttl_days) -> bool:
    if matched_at is None:
        return True
    if matched_at.tzinfo is None:
        matched_at = matched_at.replace(tzinfo=timezone.utc)
    return datetime.now(timezone.utc) - matched_at > timedelta(days=ttl_days or 30)
