"""The signed-in user at the target (contract, "The user at the target").

A ``user/`` scope means "what this user may see"; a target set to ``--users mapped``
grants one only for a user it knows. The user (the ``fhirUser`` of the token that
names them, placed at one of the issuer's sources) is mapped as the patient is:

1. a user link (table; matched, within the target's --match-ttl; blocked: no user);
2. a Patient user who is the exchange's own patient: through the patient's link;
3. else exactly one active, not replaced resource of the user's own type at the
   target, searched by an identifier both sides trust (``search.Searcher``: the
   same rules, token, deadline and 10-minute memory as patient matching);
   PractitionerRole and Person users from the table only;
4. none, ambiguous or blocked: no user.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TemporarilyUnavailable
from ..fhir_client import FHIR_ID, FHIRClient, FHIRUnavailable, search_scope
from ..upstream import Slots
from .search import (BUSY_RETRY_AFTER, MEMORY_SECONDS, SERVICE_ACTOR, WOULD_SEARCH, Searcher, claimed_identifiers,
                     deadline_of, expired, matching_slot, memory_key, read_identifiers, rematch_cutoff, systems_text,
                     unreachable, usable_identifiers)

USER_TYPES = ("Practitioner", "PractitionerRole", "RelatedPerson", "Patient", "Person")
SEARCHED_TYPES = ("Practitioner", "RelatedPerson", "Patient")  # PractitionerRole, Person: the table only
MAX_USER_URL = 2048


@dataclass(frozen=True)
class SourceUser:
    """The user as the source knows them: ``url`` = ``{source}/{Type}/{id}``; ``claims``:
    the token that named them (its identifiers are the only ones used)."""
    url: str
    source: str
    type: str
    id: str
    claims: dict


def parse_user(raw, sources, token_source: str | None) -> tuple | None:
    """(source, Type, id) of a ``fhirUser`` value: an absolute ``{source}/{Type}/{id}``
    with ``{source}`` one of ``sources``, or a relative ``{Type}/{id}`` read against the
    token's source; Type one of USER_TYPES, id a FHIR id. Anything else: None."""
    if not isinstance(raw, str) or not raw or len(raw) > MAX_USER_URL:
        return None
    if "://" in raw:
        for source in sources:
            prefix = source.rstrip("/") + "/"
            if raw.startswith(prefix):
                rest = raw[len(prefix):]
                break
        else:
            return None
    else:
        source, rest = token_source, raw
        if source is None:
            return None
    rtype, sep, rid = rest.partition("/")
    if not sep or rtype not in USER_TYPES or not FHIR_ID.match(rid):
        return None
    return source, rtype, rid


def source_user(p) -> SourceUser | None:
    """The user of an exchange (``p``: subject.Presented): the ``fhirUser`` of the ID token
    when it carries one; else of the JWT access token or the introspection answer; for
    the JWT grant, of the assertion."""
    for claims in (p.id_claims, p.claims):
        if claims and "fhirUser" in claims:
            found = parse_user(claims.get("fhirUser"), p.issuer.sources, p.source)
            if found is None:
                return None
            source, rtype, rid = found
            return SourceUser(f"{source.rstrip('/')}/{rtype}/{rid}", source, rtype, rid, claims)
    return None


@dataclass(frozen=True)
class UserMapped:
    """How the user was mapped: ``target_user`` (``Practitioner/789``; None: no user/
    scopes), the audit's ``user_link``, a sentence for `explain`, the source user's URL."""
    target_user: str | None
    origin: str  # table | matched | matched-stored | patient | none | ambiguous | blocked | would-search
    explain: str
    source_user: str | None = None


class UserMappingUnavailable(TemporarilyUnavailable):
    """User matching could not reach the target or the EHR: 503 with Retry-After; the
    decision's audit record says ``user_link`` = LINK."""
    LINK = "unavailable"


class UserMapper:
    def __init__(self, store, matcher=None):
        self.store = store
        self.matcher = matcher

    def map(self, p, target, cfg, target_patient: str | None, dry_run: bool = False,
            shared: dict | None = None) -> UserMapped:
        """The exchange's user at a ``mapped`` target; ``target_patient``: the patient step's."""
        u = source_user(p)
        if u is None:
            return UserMapped(None, "none", "the tokens name no user (fhirUser) at a source this issuer vouches "
                                            "for")
        row = self.store.users.find(u.url, target.id, cfg.generation)
        mapped = self._stored(u, row, p, target, target_patient)
        if mapped is not None:
            return mapped
        if u.type not in SEARCHED_TYPES:
            return UserMapped(None, "none", f"no user link maps this {u.type} to the target ({u.type} users are "
                                            "mapped from the table only)", u.url)
        if self.matcher is None or not target.user_match_identifiers:
            return UserMapped(None, "none", "no user link maps this user to the target, and the target is not set "
                                            "up for user matching", u.url)
        return self.matcher.match(u, p.issuer, target, cfg, stale=row is not None, dry_run=dry_run, shared=shared)

    def _stored(self, u: SourceUser, row, p, target, target_patient) -> UserMapped | None:
        if row is not None:
            target_user, origin, matched_at = row
            if origin == "table":
                return UserMapped(target_user, "table", f"a user link maps {u.url} to {target_user}", u.url)
            if origin == "blocked":
                return UserMapped(None, "blocked", "an admin blocked matching this user at this target", u.url)
            if not expired(matched_at, target.match_ttl_days):
                return UserMapped(target_user, "matched-stored", f"{u.url} was matched earlier to {target_user}",
                                  u.url)
        if u.type == "Patient" and u.source == p.source and u.id == p.patient:
            if target_patient is None:
                link = self.store.find_link(p.source, p.patient, target.id)
                if link is not None and (link[1] == "table" or (
                        link[1] == "matched" and not expired(link[2], target.match_ttl_days))):
                    target_patient = link[0]
            if target_patient is None:
                return UserMapped(None, "none", "the user is the exchange's patient, who has no link at this "
                                                "target", u.url)
            return UserMapped(f"Patient/{target_patient}", "patient", "the user is the exchange's patient: "
                              f"mapped through the patient's link to Patient/{target_patient}", u.url)
        return None


@dataclass(frozen=True)
class UserDecision:
    """What one user match decided: matched | none | ambiguous (searched or remembered),
    table | blocked (a stored row won), or would-search (a dry run)."""
    outcome: str
    target_user: str | None = None
    system: str | None = None
    searched: tuple = ()
    stored: bool = False
    remembered: bool = False
    explain: str = ""


class UserMatcher:
    """Identifiers of the user -> searches at the target -> exactly one -> a stored user link."""

    def __init__(self, settings, store, fhir: FHIRClient, metrics=None, slots: Slots | None = None):
        self.settings, self.store, self.fhir, self.metrics, self.slots = settings, store, fhir, metrics, slots
        self.searcher = Searcher(settings, store, fhir, metrics)

    def match(self, u: SourceUser, issuer, target, cfg, stale: bool, dry_run: bool,
              shared: dict | None = None) -> UserMapped:
        with matching_slot(self.slots, self.metrics, lambda: UserMappingUnavailable(
                "User matching is busy with other exchanges; retry after the indicated delay.",
                retry_after=BUSY_RETRY_AFTER, detail="every matching slot of this worker is waiting on an upstream")):
            try:
                d = self.run(cfg, [issuer], target, u, claims=u.claims, stale=stale, search=not dry_run,
                             store=not dry_run, shared=shared)
            except FHIRUnavailable as e:
                raise self.unavailable(e, target) from None
        if d.outcome in ("matched", "table"):
            return UserMapped(d.target_user, d.outcome, d.explain, u.url)
        return UserMapped(None, d.outcome, d.explain, u.url)

    def unavailable(self, e: FHIRUnavailable, target) -> UserMappingUnavailable:
        what = unreachable(e, target, self.metrics, "user")
        return UserMappingUnavailable(f"User matching could not reach {what}; retry after the indicated delay.",
                                      retry_after=e.retry_after, detail=f"user matching: {e}")

    def run(self, cfg, issuers, target, u: SourceUser, *, claims=None, given=None, stale=False, search=True,
            store=True, memory=True, replace_any=False, actor=SERVICE_ACTOR, shared=None) -> UserDecision:
        """One match of the source user at target, as ``patients.Matcher.run`` for a
        patient: identifiers ``given`` (an admin's), else the issuer's user identifier
        claim in ``claims``, else the user's own resource read at the source (Backend
        Services). Raises FHIRUnavailable."""
        allowed = set(target.user_match_identifiers) & {s for i in issuers for s in i.user_identifier_systems}
        deadline = deadline_of(self.fhir.upstream, shared)
        if given is not None:
            ids, whence = usable_identifiers(given, allowed), "the identifiers given"
        else:
            whence = "the token that names the user"
            ids = claimed_identifiers(claims, issuers, lambda issuer: issuer.user_identifier_claim, allowed)
            reader = next((i for i in issuers if i.fhir_client_id), None)
            if not ids and reader is not None:
                if not search:
                    return UserDecision(WOULD_SEARCH, explain=(
                        f"no user link yet; the token carries no usable identifier, so the service would read "
                        f"{u.url} (SMART Backend Services) and search the target's {u.type} resources for its "
                        f"identifiers of {systems_text(allowed)}; explain reads and searches nothing"))
                ids = read_identifiers(cfg, u.source, allowed, lambda key: self.fhir.read(
                    reader, key, u.source, u.type, u.id, deadline, search_scope(u.type)))
                whence = f"the user's {u.type} at the EHR"
        if not ids:
            return UserDecision("none", explain=f"no user link, and {whence} carries no usable identifier of "
                                                f"{systems_text(allowed)}")
        systems = tuple(dict.fromkeys(i.system for i in ids))
        key = memory_key("user:" + u.url, "", target.base_url, ids)
        if memory:
            remembered = self.store.remembered_match(key)
            if remembered is not None:
                return UserDecision(remembered, searched=systems, remembered=True, explain=(
                    f"the last search (within {MEMORY_SECONDS // 60} minutes) found "
                    f"{'no user' if remembered == 'none' else 'several users'} for these identifiers"))
        if not search:
            return UserDecision(WOULD_SEARCH, searched=systems, explain=(
                f"no user link yet; the service would search the target's {u.type} resources for {len(ids)} "
                f"identifier(s) of {', '.join(systems)} and link on exactly one match; explain searches nothing"))
        found, system, ambiguous = self.searcher.search(cfg, target, u.type, ids, deadline, actor)
        if ambiguous or len(found) > 1 or not found:
            outcome = "ambiguous" if ambiguous or len(found) > 1 else "none"
            return self._no_match(outcome, u, target, key, systems, stale, store, replace_any, actor)
        target_user = f"{u.type}/{next(iter(found))}"
        if not store:
            return UserDecision("matched", target_user, system, systems, explain=(
                f"exactly one {u.type} at the target carries the {system} identifier (nothing stored)"))
        stored_user, origin = self.store.users.store_matched(
            u.url, target.id, target_user, system, replace=stale or replace_any, actor=actor,
            detail=f"{u.url} -> {target.base_url} {target_user} (matched by {system})")
        if origin == "matched":
            return UserDecision("matched", stored_user, system, systems, stored=True, explain=(
                f"exactly one {u.type} at the target carries the {system} identifier; user link stored"))
        if origin == "table":
            return UserDecision("table", stored_user, searched=systems, explain="a user link (stored meanwhile)")
        return UserDecision("blocked", searched=systems, explain="an admin blocked (or removed) this user meanwhile")

    def _no_match(self, outcome, u, target, key, systems, stale, store, replace_any, actor) -> UserDecision:
        what = "no user" if outcome == "none" else "several users"
        if not store:
            return UserDecision(outcome, searched=systems, explain=f"the target has {what} for these identifiers "
                                                                   "(nothing stored)")
        if stale or replace_any:
            self.store.users.drop_matched(u.url, target.id, rematch_cutoff(target, replace_any), actor,
                                          f"{u.url} -> {target.base_url}: rematched, {outcome}")
        self.store.remember_match(key, outcome, MEMORY_SECONDS)
        return UserDecision(outcome, searched=systems, stored=True, explain=(
            f"the target has {what} for these identifiers; remembered for {MEMORY_SECONDS // 60} minutes"))


def make_user_matcher(settings, store, upstream, metrics=None, slots: Slots | None = None) -> UserMatcher:
    """The service's user matcher; ``slots``: shared with patient matching."""
    return UserMatcher(settings, store, FHIRClient(upstream), metrics,
                       slots if slots is not None else Slots(settings.match_concurrency))
