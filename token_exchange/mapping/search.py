"""Exactly one, shared by patients and users (contract, "Patient matching at the target",
and "The user at the target", which mirrors it).

Usable identifiers (step 1), the searches at the target with the service's own search
token (step 2), the exactly-one rule over their searchsets (step 3), and the key of the
10-minute memory of none and ambiguous. ``patients.py`` and ``users.py`` decide what
to search for and where a match is stored; neither holds a copy of these rules.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..clock import aware, utcnow
from ..fhir_client import FHIR_ID, FHIRUnavailable, search_scope, search_token

MAX_IDENTIFIERS = 5  # searched per match
MAX_VALUE = 128  # characters of an identifier value
MAX_SCANNED = 100  # identifiers read from one claim or resource; the rest are ignored
MEMORY_SECONDS = 600  # how long "none" and "ambiguous" are remembered
BUSY_RETRY_AFTER = 2  # seconds, when every matching slot is taken
SERVICE_ACTOR = "token-exchange"  # the admin events' actor for what the service does itself
WOULD_SEARCH = "would-search"  # a dry run (explain) stopped where the exchange would search the target
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc

log = logging.getLogger("token_exchange.matching")


# -- usable identifiers (contract step 1) ------------------------------------------------
@dataclass(frozen=True)
class Identifier:
    system: str
    value: str


def claimed_identifiers(claims, issuers, claim_of, systems) -> list[Identifier]:
    """The usable identifiers (``usable_identifiers``) in the claim ``claim_of(issuer)``
    names, of the first issuer whose claim carries any: a patient's or a user's."""
    for issuer in issuers:
        ids = usable_identifiers((claims or {}).get(claim_of(issuer)), systems)
        if ids:
            return ids
    return []


def read_identifiers(cfg, source: str, systems, read) -> list[Identifier]:
    """The usable identifiers of the resource ``read(key)`` reads at the EHR (SMART Backend
    Services, its assertion signed with the active key); none when it is not found."""
    if cfg.active_key is None:
        raise FHIRUnavailable("EHR", source, "no active signing key for the Backend Services assertion")
    resource = read(cfg.active_key)
    return usable_identifiers(resource.get("identifier"), systems) if resource is not None else []


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


def searchset_matches(bundle: dict, ident: Identifier, resource_type: str = "Patient") -> tuple[set, bool]:
    """(ids of the resources of ``resource_type`` (a Patient, a Practitioner ...) in this searchset that count, whether the search alone
    is ambiguous: a ``next`` link, ``total`` above 1, or two Patients that count).
    An entry counts when it is of that type, whose ``search.mode`` is ``match`` or
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
        if _counts(e, resource, ident, resource_type):
            pid = resource.get("id")
            if not isinstance(pid, str) or not FHIR_ID.match(pid):
                raise Malformed(f"a matching {resource_type} has no valid id")
            found.add(pid)
    ambiguous = any(lk.get("relation") == "next" for lk in links) or (total or 0) > 1 or len(found) > 1
    return found, ambiguous


def _counts(entry: dict, resource: dict, ident: Identifier, resource_type: str) -> bool:
    if resource.get("resourceType") != resource_type:
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



def memory_key(source: str, patient: str, target: str, identifiers) -> str:
    """SHA-256 of (source, patient, target, the usable identifiers, sorted). Users are
    remembered under (``user:`` + their URL, "", target, identifiers)."""
    ids = sorted([i.system, i.value] for i in identifiers)
    return hashlib.sha256(json.dumps([source, patient, target, ids]).encode()).hexdigest()


def expired(matched_at, ttl_days) -> bool:
    """Whether a matched link is older than the target's --match-ttl (days; 30 by default)."""
    if matched_at is None:
        return True
    return utcnow() - aware(matched_at) > timedelta(days=ttl_days or 30)


def deadline_of(upstream, shared: dict | None):
    """The one deadline of an exchange's matching (patient, then user): made by the first
    step that reaches outside, kept in ``shared`` for the next."""
    if shared is None:
        return upstream.deadline()
    if "deadline" not in shared:
        shared["deadline"] = upstream.deadline()
    return shared["deadline"]


def rematch_cutoff(target, replace_any: bool):
    """A rematch that found none or several drops the matched row: any (``replace_any``, an
    admin's `match`), else only one past the target's --match-ttl (days; 30 by default)."""
    return None if replace_any else datetime.now(timezone.utc) - timedelta(days=target.match_ttl_days or 30)


@contextmanager
def matching_slot(slots, metrics, busy):
    """One of the process's ``slots`` for one exchange's matching, given back after it;
    when every slot is taken the exchange is refused at once with ``busy()`` (503) rather
    than queued behind them (docs/SECURITY.md, resource model)."""
    if slots is not None and not slots.take():
        if metrics is not None:
            metrics.inc("match_busy")
        raise busy()
    try:
        yield
    finally:
        if slots is not None:
            slots.give_back()


def unreachable(e: FHIRUnavailable, target, metrics, what: str) -> str:
    """Contract step 4: ``what`` (patient, user) matching could not reach the target or
    the EHR: a log line naming the target and the status, a metric; -> which it was."""
    if metrics is not None:
        metrics.inc("match_failures")
    log.warning(f"{what} matching unavailable", extra={
        "target": target.base_url, "party": e.party, "url": e.where, "status": e.status, "reason": e.reason})
    return "the target FHIR server" if e.party == "target" else "the EHR"


def systems_text(systems) -> str:
    return ", ".join(sorted(systems)) or "a system both the issuer and the target list (none is)"


class Searcher:
    """Contract step 2 and 3 for one resource type: one self-minted token (an admin event
    with its jti), one search per identifier, all within one deadline; exactly one
    resource across them, stopping at the first ambiguity."""

    def __init__(self, settings, store, fhir, metrics=None):
        self.settings, self.store, self.fhir, self.metrics = settings, store, fhir, metrics

    def search(self, cfg, target, resource_type: str, ids, deadline, actor: str) -> tuple[dict, str | None, bool]:
        """-> (found: {id: the first system that found it}, the system of a single match,
        ambiguous). Raises FHIRUnavailable."""
        key = cfg.active_key
        if key is None:
            raise FHIRUnavailable("target", target.base_url, "no active signing key for the search token")
        scope = search_scope(resource_type)
        token, jti = search_token(key, self.settings.issuer, target.base_url, scope)
        what = "a patient" if resource_type == "Patient" else f"a user ({resource_type})"
        self.store.record_admin_event(actor, "match.search-token", f"jti {jti} for {what} search at {target.base_url}")
        found: dict = {}
        for ident in ids:
            if self.metrics is not None:
                self.metrics.inc("match_searches")
            bundle = self.fhir.search(target.base_url, token, ident.system, ident.value, deadline, resource_type)
            try:
                ids_here, ambiguous = searchset_matches(bundle, ident, resource_type)
            except Malformed as e:
                raise FHIRUnavailable("target", target.base_url, f"malformed searchset ({e})", 200) from None
            for rid in ids_here:
                found.setdefault(rid, ident.system)
            if ambiguous or len(found) > 1:
                return found, None, True
        system = next(iter(found.values())) if found else None
        return found, system, False
