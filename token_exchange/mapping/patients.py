"""Patient mapping onto the target (contract rule 7 and "Patient matching at the target").

A stored link answers with no outbound call. Where none exists and the target is
set up for matching, the patient is looked for at the target by an identifier
both sides trust (see ``Matcher``), and linked only on exactly one match.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TemporarilyUnavailable
from ..fhir_client import FHIRClient, FHIRUnavailable
from ..upstream import Slots
from .search import (BUSY_RETRY_AFTER, MEMORY_SECONDS, SERVICE_ACTOR, WOULD_SEARCH, Searcher, claimed_identifiers,
                     deadline_of, expired, matching_slot, memory_key, read_identifiers, rematch_cutoff, systems_text,
                     unreachable, usable_identifiers)


@dataclass(frozen=True)
class Mapped:
    """How the patient was mapped: ``target_patient`` (None: no patient scopes), the
    audit's ``link`` value, and a sentence for `explain`."""
    target_patient: str | None
    origin: str | None  # table | matched | matched-stored | none | ambiguous | unavailable | would-search
    explain: str



class MatchingUnavailable(TemporarilyUnavailable):
    """Matching could not reach the target or the EHR (contract step 4): 503 with
    Retry-After; the decision's audit record says ``link`` = LINK."""
    LINK = "unavailable"


class PatientMapper:
    def __init__(self, store, matcher=None):
        self.store = store
        self.matcher = matcher

    def map(self, p, target, cfg, dry_run: bool = False, shared: dict | None = None) -> Mapped:
        """The presented patient (``p``: subject.Presented) at ``target`` under the
        trust snapshot ``cfg``: a stored link, else a match (not stored in a dry run)."""
        row = self.store.find_link(p.source, p.patient, target.id, cfg.generation)
        if row is not None:
            target_patient, origin, matched_at = row
            if origin == "table":
                return Mapped(target_patient, "table", "a table link")
            if origin == "blocked":
                return Mapped(None, "none", "an admin blocked matching this patient at this target")
            if not expired(matched_at, target.match_ttl_days):
                return Mapped(target_patient, "matched-stored", "a link matched earlier")
        if self.matcher is None or not target.match_identifiers:
            return Mapped(None, "none", "no patient link maps it to this target, and the target is not set up "
                                        "for matching")
        return self.matcher.match(p, target, cfg, stale=row is not None, dry_run=dry_run, shared=shared)


@dataclass(frozen=True)
class Decision:
    """What one match decided. outcome: matched | none | ambiguous (searched or
    remembered), table | blocked (a stored row won), or would-search (a dry run)."""
    outcome: str
    target_patient: str | None = None
    system: str | None = None
    searched: tuple = ()  # the systems searched
    stored: bool = False
    remembered: bool = False
    explain: str = ""

    def mapped(self) -> Mapped:
        if self.outcome in ("matched", "table"):
            return Mapped(self.target_patient, self.outcome, self.explain)
        if self.outcome == WOULD_SEARCH:
            return Mapped(None, WOULD_SEARCH, self.explain)
        return Mapped(None, "none" if self.outcome == "blocked" else self.outcome, self.explain)


class Matcher:
    """Identifiers -> searches at the target -> exactly one -> a stored link."""

    def __init__(self, settings, store, fhir: FHIRClient, metrics=None, slots: Slots | None = None):
        self.settings, self.store, self.fhir, self.metrics = settings, store, fhir, metrics
        self.slots = slots
        self.searcher = Searcher(settings, store, fhir, metrics)

    def match(self, p, target, cfg, stale: bool, dry_run: bool, shared: dict | None = None) -> Mapped:
        """For an exchange: the identifiers of the token that supplied the patient;
        the 10-minute memory honoured; ``dry_run`` (explain) searches and writes nothing.
        At most ``slots`` exchanges of this process match at once; one more is refused
        at once (503) rather than queued behind them (docs/SECURITY.md, resource model)."""
        with matching_slot(self.slots, self.metrics, lambda: MatchingUnavailable(
                "Patient matching is busy with other exchanges; retry after the indicated delay.",
                retry_after=BUSY_RETRY_AFTER, detail="every matching slot of this worker is waiting on an upstream")):
            try:
                decision = self.run(cfg, [p.issuer], target, p.source, p.patient,
                                    claims=p.patient_claims or {}, stale=stale, search=not dry_run, store=not dry_run,
                                    shared=shared)
            except FHIRUnavailable as e:
                raise self.unavailable(e, target) from None
        return decision.mapped()

    def unavailable(self, e: FHIRUnavailable, target) -> MatchingUnavailable:
        """Contract step 4: 503 with Retry-After; a log line naming the target and the status; a metric."""
        what = unreachable(e, target, self.metrics, "patient")
        return MatchingUnavailable(f"Patient matching could not reach {what}; retry after the indicated delay.",
                                   retry_after=e.retry_after, detail=f"matching: {e}")

    def run(self, cfg, issuers, target, source: str, patient: str, *, claims=None, given=None, stale=False,
            search=True, store=True, memory=True, replace_any=False, actor=SERVICE_ACTOR, shared=None) -> Decision:
        """One match of (source, patient) at target. Identifiers: ``given`` (an
        admin's), else the issuer's identifier claim in ``claims``, else the source
        Patient read at the EHR (Backend Services). ``search`` False: nothing leaves
        the service; ``store`` False: nothing is written; ``memory`` False: the
        10-minute memory is not consulted; ``replace_any``: any matched row is
        replaced, not only one past its TTL; ``shared``: the exchange's state shared with
        user matching (one deadline for both). Raises FHIRUnavailable."""
        allowed = set(target.match_identifiers) & {s for i in issuers for s in i.identifier_systems}
        deadline = deadline_of(self.fhir.upstream, shared)  # one for every call of this exchange's matching
        if given is not None:
            ids, whence = usable_identifiers(given, allowed), "the identifiers given"
        else:
            whence = "the token that supplied the patient"
            ids = claimed_identifiers(claims, issuers, lambda issuer: issuer.identifier_claim, allowed)
            reader = next((i for i in issuers if i.fhir_client_id), None)
            if not ids and reader is not None:
                if not search:
                    return Decision(WOULD_SEARCH, explain=(
                        f"no link yet; the token carries no usable identifier, so the service would read "
                        f"Patient/{patient} at {source} (SMART Backend Services) and search the target for its "
                        f"identifiers of {systems_text(allowed)}; explain reads and searches nothing"))
                ids = read_identifiers(cfg, source, allowed,
                                       lambda key: self.fhir.read_patient(reader, key, source, patient, deadline))
                whence = "the source Patient at the EHR"
        if not ids:  # no search, nothing remembered
            return Decision("none", explain=f"no link, and {whence} carries no usable identifier of "
                                            f"{systems_text(allowed)}")
        systems = tuple(dict.fromkeys(i.system for i in ids))
        key = memory_key(source, patient, target.base_url, ids)
        if memory:
            remembered = self.store.remembered_match(key)
            if remembered is not None:
                return Decision(remembered, searched=systems, remembered=True, explain=(
                    f"the last search (within {MEMORY_SECONDS // 60} minutes) found "
                    f"{'no patient' if remembered == 'none' else 'several patients'} for these identifiers"))
        if not search:
            return Decision(WOULD_SEARCH, searched=systems, explain=(
                f"no link yet; the service would search the target for {len(ids)} identifier(s) of "
                f"{', '.join(systems)} and link on exactly one match; explain searches nothing"))
        found, system, ambiguous = self.searcher.search(cfg, target, "Patient", ids, deadline, actor)
        if ambiguous or len(found) > 1:
            return self._no_match("ambiguous", source, patient, target, key, systems, stale, store, replace_any,
                                  actor)
        if not found:
            return self._no_match("none", source, patient, target, key, systems, stale, store, replace_any,
                                  actor)
        (target_patient,) = found
        if not store:
            return Decision("matched", target_patient, system, systems, explain=(
                f"exactly one patient at the target carries the {system} identifier (nothing stored)"))
        stored_patient, origin = self.store.store_matched_link(
            source, patient, target.id, target_patient, system, replace=stale or replace_any, actor=actor,
            detail=f"{source} {patient} -> {target.base_url} {target_patient} (matched by {system})")
        if origin == "matched":
            return Decision("matched", stored_patient, system, systems, stored=True, explain=(
                f"exactly one patient at the target carries the {system} identifier; link stored"))
        if origin == "table":  # an admin's link arrived meanwhile: it wins
            return Decision("table", stored_patient, searched=systems, explain="a table link (stored meanwhile)")
        return Decision("blocked", searched=systems, explain="an admin blocked (or removed) this link meanwhile")

    def _no_match(self, outcome, source, patient, target, key, systems, stale, store, replace_any,
                  actor) -> Decision:
        what = "no patient" if outcome == "none" else "several patients"
        if not store:
            return Decision(outcome, searched=systems, explain=f"the target has {what} for these identifiers "
                                                               "(nothing stored)")
        if stale or replace_any:  # the new outcome replaces the matched row: it goes
            self.store.drop_matched_link(source, patient, target.id, rematch_cutoff(target, replace_any), actor,
                                         f"{source} {patient} -> {target.base_url}: rematched, {outcome}")
        self.store.remember_match(key, outcome, MEMORY_SECONDS)
        return Decision(outcome, searched=systems, stored=True, explain=(
            f"the target has {what} for these identifiers; remembered for {MEMORY_SECONDS // 60} minutes"))


def make_matcher(settings, store, upstream, metrics=None) -> Matcher:
    """The service's matcher: exchanges bounded by TOKEN_EXCHANGE_MATCH_CONCURRENCY."""
    return Matcher(settings, store, FHIRClient(upstream), metrics, Slots(settings.match_concurrency))
