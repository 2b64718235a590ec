"""Patient mapping onto the target (contract rule 7 and "Patient matching at the target").

A stored link answers with no outbound call. Where none exists and the target is
set up for matching, the patient is looked for at the target by an identifier
both sides trust (see ``Matcher``), and linked only on exactly one match.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .clock import aware, utcnow
from .errors import TemporarilyUnavailable
from .fhir_client import FHIR_ID, FHIRClient, FHIRUnavailable, search_token
from .upstream import Slots

log = logging.getLogger(__name__)

MAX_IDENTIFIERS = 5  # searched per match
MAX_VALUE = 128  # characters of an identifier value
MAX_SCANNED = 100  # identifiers read from one claim or Patient; the rest are ignored
MEMORY_SECONDS = 600  # how long "none" and "ambiguous" are remembered
BUSY_RETRY_AFTER = 2  # seconds, when every matching slot is taken
SERVICE_ACTOR = "token-exchange"  # the admin events' actor for what the service does itself
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


@dataclass(frozen=True)
class Mapped:
    """How the patient was mapped: ``target_patient`` (None: no patient scopes), the
    audit's ``link`` value, and a sentence for `explain`."""
    target_patient: str | None
    origin: str | None  # table | matched | matched-stored | none | ambiguous | unavailable | would-search
    explain: str


WOULD_SEARCH = "would-search"  # a dry run (explain) stopped where the exchange would search the target


class MatchingUnavailable(TemporarilyUnavailable):
    """Matching could not reach the target or the EHR (contract step 4): 503 with
    Retry-After; the decision's audit record says ``link`` = LINK."""
    LINK = "unavailable"


class PatientMapper:
    def __init__(self, store, matcher=None):
        self.store = store
        self.matcher = matcher

    def map(self, p, target, cfg, dry_run: bool = False) -> Mapped:
        """The presented patient (``p``: subject.Presented) at ``target`` under the
        trust snapshot ``cfg``: a stored link, else a match (not stored in a dry run)."""
        row = self.store.find_link(p.source, p.patient, target.id, cfg.generation)
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
        return self.matcher.match(p, target, cfg, stale=row is not None, dry_run=dry_run)


def _expired(matched_at, ttl_days) -> bool:
    if matched_at is None:
        return True
    return utcnow() - aware(matched_at) > timedelta(days=ttl_days or 30)


# -- usable identifiers (contract step 1) ------------------------------------------------
@dataclass(frozen=True)
class Identifier:
    system: str
    value: str


def usable_identifiers(raw, systems) -> list[Identifier]:
    """The identifiers matching may search: from a JSON array of FHIR Identifier
    objects or ``system|value`` strings, those of a system in ``systems`` (what the
    issuer vouches for and the target lists), not ``use: old``, not past
    ``period.end``, with a value of at most 128 characters without control
    characters; duplicates once; at most 5, in the order given."""
    if not isinstance(raw, list):
        return []
    out: list[Identifier] = []
    for item in raw[:MAX_SCANNED]:
        ident = _identifier(item)
        if ident is not None and ident.system in systems and ident not in out:
            out.append(ident)
            if len(out) == MAX_IDENTIFIERS:
                break
    return out


def _identifier(item) -> Identifier | None:
    if isinstance(item, str):
        system, sep, value = item.partition("|")
        if not sep:
            return None
    elif isinstance(item, dict):  # FHIR R4 Identifier (2.24.0.1)
        system, value = item.get("system"), item.get("value")
        if item.get("use") == "old":
            return None
        if "period" in item and _ended(item["period"]):
            return None
    else:
        return None
    if not isinstance(system, str) or not isinstance(value, str) or not system or not value:
        return None
    if len(value) > MAX_VALUE or _CONTROL.search(value) or _CONTROL.search(system):
        return None
    return Identifier(system, value)


_DATETIME = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d{1,9})?)?"
                       r"(Z|[+-]\d{2}:\d{2}))?)?)?\Z")


def _ended(period) -> bool:
    """Whether a FHIR Period has ended (its end is past). A partial end date ("2024",
    "2024-05", "2024-05-31") lasts to the end of that year, month or day (UTC); a
    period that cannot be read counts as ended, so its identifier is not used."""
    if not isinstance(period, dict):
        return True
    end = period.get("end")
    if end is None:
        return False
    m = _DATETIME.match(end) if isinstance(end, str) else None
    if m is None:
        return True
    year, month, day, hour, minute, second, tz = m.groups()
    now = datetime.now(timezone.utc)
    try:
        if hour is not None:
            offset = timedelta(0) if tz == "Z" else (1 if tz[0] == "+" else -1) * timedelta(
                hours=int(tz[1:3]), minutes=int(tz[4:6]))
            at = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0),
                          tzinfo=timezone(offset))
            return at < now
        if day is not None:
            bound = datetime(int(year), int(month), int(day), tzinfo=timezone.utc) + timedelta(days=1)
        elif month is not None:
            y, mo = (int(year), int(month) + 1) if int(month) < 12 else (int(year) + 1, 1)
            bound = datetime(y, mo, 1, tzinfo=timezone.utc)
        else:
            bound = datetime(int(year) + 1, 1, 1, tzinfo=timezone.utc)
    except (ValueError, OverflowError):
        return True
    return bound <= now


# -- exactly one (contract step 3) ------------------------------------------------------------
class Malformed(ValueError):
    """A searchset that cannot be read as the contract needs."""


def searchset_matches(bundle: dict, ident: Identifier) -> tuple[set, bool]:
    """(ids of the Patients in this searchset that count, whether the search alone
    is ambiguous: a ``next`` link, ``total`` above 1, or two Patients that count).
    An entry counts when it is a Patient whose ``search.mode`` is ``match`` or
    absent, carrying an identifier with exactly this system and value (the
    target's own comparison may ignore case or escapes), ``active`` not false,
    and no ``link`` of type ``replaced-by``."""
    total = bundle.get("total")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
        raise Malformed("total is not a count")
    links = bundle.get("link", [])
    if not isinstance(links, list) or not all(isinstance(lk, dict) for lk in links):
        raise Malformed("link is not a list of links")
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise Malformed("entry is not a list")
    found = set()
    for e in entries:
        resource = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(resource, dict):
            raise Malformed("an entry has no resource")
        if _counts(e, resource, ident):
            pid = resource.get("id")
            if not isinstance(pid, str) or not FHIR_ID.match(pid):
                raise Malformed("a matching Patient has no valid id")
            found.add(pid)
    ambiguous = any(lk.get("relation") == "next" for lk in links) or (total or 0) > 1 or len(found) > 1
    return found, ambiguous


def _counts(entry: dict, resource: dict, ident: Identifier) -> bool:
    if resource.get("resourceType") != "Patient":
        return False
    search = entry.get("search")
    mode = search.get("mode") if isinstance(search, dict) else None
    if search is not None and (not isinstance(search, dict) or mode not in (None, "match")):
        return False
    if resource.get("active") is False:
        return False
    links = resource.get("link")
    if isinstance(links, list) and any(isinstance(lk, dict) and lk.get("type") == "replaced-by" for lk in links):
        return False
    idents = resource.get("identifier")
    return isinstance(idents, list) and any(
        isinstance(i, dict) and i.get("system") == ident.system and i.get("value") == ident.value for i in idents)


# -- the matcher -------------------------------------------------------------------------------
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


def memory_key(source: str, patient: str, target: str, identifiers) -> str:
    """SHA-256 of (source, patient, target, the usable identifiers, sorted)."""
    ids = sorted([i.system, i.value] for i in identifiers)
    return hashlib.sha256(json.dumps([source, patient, target, ids]).encode()).hexdigest()


class Matcher:
    """Identifiers -> searches at the target -> exactly one -> a stored link."""

    def __init__(self, settings, store, fhir: FHIRClient, metrics=None, slots: Slots | None = None):
        self.settings, self.store, self.fhir, self.metrics = settings, store, fhir, metrics
        self.slots = slots

    def match(self, p, target, cfg, stale: bool, dry_run: bool) -> Mapped:
        """For an exchange: the identifiers of the token that supplied the patient;
        the 10-minute memory honoured; ``dry_run`` (explain) searches and writes nothing.
        At most ``slots`` exchanges of this process match at once; one more is refused
        at once (503) rather than queued behind them (docs/SECURITY.md, resource model)."""
        if self.slots is not None and not self.slots.take():
            if self.metrics is not None:
                self.metrics.inc("match_busy")
            raise MatchingUnavailable("Patient matching is busy with other exchanges; retry after the indicated "
                                      "delay.", retry_after=BUSY_RETRY_AFTER,
                                      detail="every matching slot of this worker is waiting on an upstream")
        try:
            decision = self.run(cfg, [p.issuer], target, p.source, p.patient,
                                claims=p.patient_claims or {}, stale=stale, search=not dry_run, store=not dry_run)
        except FHIRUnavailable as e:
            raise self.unavailable(e, target) from None
        finally:
            if self.slots is not None:
                self.slots.give_back()
        return decision.mapped()

    def unavailable(self, e: FHIRUnavailable, target) -> MatchingUnavailable:
        """Contract step 4: 503 with Retry-After; a log line naming the target and the status; a metric."""
        if self.metrics is not None:
            self.metrics.inc("match_failures")
        log.warning("patient matching unavailable", extra={
            "target": target.base_url, "party": e.party, "url": e.where, "status": e.status, "reason": e.reason})
        what = "the target FHIR server" if e.party == "target" else "the EHR"
        return MatchingUnavailable(f"Patient matching could not reach {what}; retry after the indicated delay.",
                                   retry_after=e.retry_after, detail=f"matching: {e}")

    def run(self, cfg, issuers, target, source: str, patient: str, *, claims=None, given=None, stale=False,
            search=True, store=True, memory=True, replace_any=False, actor=SERVICE_ACTOR) -> Decision:
        """One match of (source, patient) at target. Identifiers: ``given`` (an
        admin's), else the issuer's identifier claim in ``claims``, else the source
        Patient read at the EHR (Backend Services). ``search`` False: nothing leaves
        the service; ``store`` False: nothing is written; ``memory`` False: the
        10-minute memory is not consulted; ``replace_any``: any matched row is
        replaced, not only one past its TTL. Raises FHIRUnavailable."""
        allowed = set(target.match_identifiers) & {s for i in issuers for s in i.identifier_systems}
        deadline = self.fhir.upstream.deadline()  # one for every call of this match
        if given is not None:
            ids, whence = usable_identifiers(given, allowed), "the identifiers given"
        else:
            ids, whence = [], "the token that supplied the patient"
            for issuer in issuers:
                ids = usable_identifiers((claims or {}).get(issuer.identifier_claim), allowed)
                if ids:
                    break
            reader = next((i for i in issuers if i.fhir_client_id), None)
            if not ids and reader is not None:
                if not search:
                    return Decision(WOULD_SEARCH, explain=(
                        f"no link yet; the token carries no usable identifier, so the service would read "
                        f"Patient/{patient} at {source} (SMART Backend Services) and search the target for its "
                        f"identifiers of {_systems(allowed)}; explain reads and searches nothing"))
                if cfg.active_key is None:
                    raise FHIRUnavailable("EHR", source, "no active signing key for the Backend Services assertion")
                resource = self.fhir.read_patient(reader, cfg.active_key, source, patient, deadline)
                if resource is not None:
                    ids = usable_identifiers(resource.get("identifier"), allowed)
                whence = "the source Patient at the EHR"
        if not ids:  # no search, nothing remembered
            return Decision("none", explain=f"no link, and {whence} carries no usable identifier of "
                                            f"{_systems(allowed)}")
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
        found, system, ambiguous = self._search(cfg, target, ids, deadline, actor)
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

    def _search(self, cfg, target, ids, deadline, actor):
        """Contract step 2: one self-minted token (an admin event with its jti), one
        search per identifier, all within one deadline; stops at the first ambiguity."""
        key = cfg.active_key
        if key is None:
            raise FHIRUnavailable("target", target.base_url, "no active signing key for the search token")
        token, jti = search_token(key, self.settings.issuer, target.base_url)
        self.store.record_admin_event(actor, "match.search-token",
                                      f"jti {jti} for a patient search at {target.base_url}")
        found: dict = {}  # patient id -> the first system that found it
        for ident in ids:
            if self.metrics is not None:
                self.metrics.inc("match_searches")
            bundle = self.fhir.search(target.base_url, token, ident.system, ident.value, deadline)
            try:
                ids_here, ambiguous = searchset_matches(bundle, ident)
            except Malformed as e:
                raise FHIRUnavailable("target", target.base_url, f"malformed searchset ({e})", 200) from None
            for pid in ids_here:
                found.setdefault(pid, ident.system)
            if ambiguous or len(found) > 1:
                return found, None, True
        system = next(iter(found.values())) if found else None
        return found, system, False

    def _no_match(self, outcome, source, patient, target, key, systems, stale, store, replace_any,
                  actor) -> Decision:
        what = "no patient" if outcome == "none" else "several patients"
        if not store:
            return Decision(outcome, searched=systems, explain=f"the target has {what} for these identifiers "
                                                               "(nothing stored)")
        if stale or replace_any:  # the new outcome replaces the matched row: it goes
            cutoff = None if replace_any else datetime.now(timezone.utc) - timedelta(days=target.match_ttl_days or 30)
            self.store.drop_matched_link(source, patient, target.id, cutoff, actor,
                                         f"{source} {patient} -> {target.base_url}: rematched, {outcome}")
        self.store.remember_match(key, outcome, MEMORY_SECONDS)
        return Decision(outcome, searched=systems, stored=True, explain=(
            f"the target has {what} for these identifiers; remembered for {MEMORY_SECONDS // 60} minutes"))


def _systems(systems) -> str:
    return ", ".join(sorted(systems)) or "a system both the issuer and the target list (none is)"


def make_matcher(settings, store, upstream, metrics=None) -> Matcher:
    """The service's matcher: exchanges bounded by TOKEN_EXCHANGE_MATCH_CONCURRENCY."""
    return Matcher(settings, store, FHIRClient(upstream), metrics, Slots(settings.match_concurrency))
