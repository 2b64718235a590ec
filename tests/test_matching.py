"""Patient matching at the target (contract "Patient matching at the target"): where
no link exists, the service searches the target by an identifier both the EHR and
the target trust, links on exactly one match, remembers none/several for 10
minutes, answers 503 when it cannot ask, and never searches once a link exists.
The target is tests/fakes.py's FakeFHIR (faults); tests/test_matching_medplum.py runs
the same rules against Medplum's real FHIR search."""
from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta
from urllib.parse import quote

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text, update

from conftest import AT, IDT, SERVICE, TE, VENDOR_SECRET, audit_rows, post_token
from fakes import SOURCE, TARGET, UPSTREAM, free_port
from test_jwt_grant import JWT_BEARER, make_grant
from test_token import error_of
from token_exchange import fhir_client
from token_exchange.db import make_engine
from token_exchange.logs import JSONFormatter
from token_exchange.matching import Identifier, usable_identifiers

SSN = "urn:oid:2.16.840.1.113883.4.1"  # the issuer vouches for it, the target lists it
INS = "urn:example:insurer-member"  # both too
MRN = "urn:example:mrn"  # the issuer vouches for it; the target does not list it
OTHER = "urn:example:other"  # the target lists it; the issuer does not vouch for it
SEARCH_CLAIMS = {"iss", "aud", "sub", "client_id", "scope", "iat", "exp", "jti"}


@pytest.fixture
def matching(world, ehr, fhir):
    """Issuer A vouches for SSN, INS and MRN; target `matching-b` (the fake) lists SSN,
    INS and OTHER; the vendor may exchange A's tokens for it."""
    world("issuer", "update", ehr.issuer, "--identifier-system", SSN, "--identifier-system", INS,
          "--identifier-system", MRN)
    world("target", "add", fhir.base, "--name", "matching-b", "--match-identifier", SSN, "--match-identifier", INS,
          "--match-identifier", OTHER)
    world("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", fhir.base,
          "--scopes", "patient/*.rs user/*.rs", "--upstream-client-id", UPSTREAM)
    return world


@pytest.fixture
def swap(http, ehr, fhir, matching):
    """POST /token for the matching target, the ID token carrying `ids` as its
    patient_identifier claim (None: no claim)."""
    def do(ids=None, scope="patient/Observation.rs", client=http, id_extra=None, **over):
        extra = dict(id_extra or {})
        if ids is not None:
            extra["patient_identifier"] = ids
        data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
                "actor_token": ehr.id_token(**extra), "actor_token_type": IDT, "resource": fhir.base,
                "scope": scope}
        data.update(over)
        return post_token(client, {k: v for k, v in data.items() if v is not None})
    return do


def links(cli, *args):
    return json.loads(cli("link", "list", "--json", *args).output)


def admin_events(cli):
    return json.loads(cli("audit", "list", "--admin", "--json").output)


def last_audit(cli):
    return audit_rows(cli)[-1]


def jwks(http):
    return {k["kid"]: k for k in http.get("/jwks").get_json()["keys"]}


def metric(http, name):
    for line in http.get("/metrics").get_data(as_text=True).splitlines():
        if line.startswith(f"token_exchange_{name}_total "):
            return float(line.split()[1])
    return 0.0


def ssn(value="123-45-6789"):
    return [{"system": SSN, "value": value}]


# -- exactly one -------------------------------------------------------------------------
def test_one_match_links_the_patient_and_grants_patient_scopes(swap, fhir, matching, http):
    fhir.add("t-1", (SSN, "123-45-6789"))
    r = swap(ssn())
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["patient"] == "t-1" and r.get_json()["scope"] == "patient/Observation.rs"
    (row,) = links(matching, "--origin", "matched")
    assert row["source"] == SOURCE and row["patient"] == "a-123" and row["target"] == fhir.base
    assert row["target_patient"] == "t-1" and row["system"] == SSN and row["matched_at"]
    audit = last_audit(matching)
    assert audit["link"] == "matched" and audit["target_patient"] == "t-1" and audit["outcome"] == "granted"


def test_the_search_is_the_contract_s_request_with_a_self_minted_token_the_target_can_verify(swap, fhir, matching,
                                                                                           http):
    fhir.add("t-1", (SSN, "123-45-6789"))
    assert swap(ssn()).status_code == 200
    (s,) = fhir.searches
    assert s["path"] == "/fhir/Patient?identifier=" + quote(f"{SSN}|123-45-6789", safe="") + "&_count=2"
    assert s["headers"]["Accept"] == "application/fhir+json" and s["headers"]["Prefer"] == "handling=strict"
    header = jwt.get_unverified_header(s["token"])
    assert header["typ"] == "at+jwt"
    claims = jwt.decode(s["token"], jwt.PyJWK(jwks(http)[header["kid"]]).key, algorithms=[header["alg"]],
                        audience=fhir.base, issuer=SERVICE)
    assert set(claims) == SEARCH_CLAIMS
    assert claims["sub"] == claims["client_id"] == SERVICE and claims["scope"] == "system/Patient.rs"
    assert 0 < claims["exp"] - claims["iat"] <= 60
    events = admin_events(matching)
    assert any(e["action"] == "match.search-token" and claims["jti"] in e["detail"] for e in events)
    (stored,) = [e for e in events if e["action"] == "link.match"]
    assert "t-1" in stored["detail"] and SSN in stored["detail"] and "123-45-6789" not in stored["detail"]


@pytest.mark.parametrize("value", ["a|b", "back\\slash", "com,ma", "dol$lar"])
def test_a_value_is_fhir_escaped_and_percent_encoded(swap, fhir, value):
    fhir.add("t-1", (SSN, value))
    r = swap(ssn(value))
    assert r.status_code == 200 and r.get_json()["patient"] == "t-1"
    escaped = value.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")
    assert fhir.searches[0]["path"] == f"/fhir/Patient?identifier={quote(SSN + '|' + escaped, safe='')}&_count=2"


@pytest.mark.parametrize("value", ["..", ".", "a/../b", "../../admin", "x?y#z", "%2e%2e"])
def test_an_identifier_value_never_changes_the_path_searched(matching, fhir, value):
    """Issue 26: a value that looks like a path (dot segments, slashes) stays one query value."""
    fhir.add("t-1", (SSN, value))
    out = json.loads(matching("link", "match", "--source", SOURCE, "--patient", "a-123", "--target", fhir.base,
                              "--identifier", f"{SSN}|{value}", "--json", "--dry-run").output)
    (s,) = fhir.searches
    assert s["path"].split("?")[0] == "/fhir/Patient" and s["identifier"] == (SSN, value)
    assert out["decision"] == "matched" and out["target_patient"] == "t-1"


def test_a_second_exchange_uses_the_stored_link_without_any_search(swap, fhir, matching):
    fhir.add("t-1", (SSN, "123-45-6789"))
    assert swap(ssn()).status_code == 200
    r = swap(ssn())
    assert r.status_code == 200 and r.get_json()["patient"] == "t-1"
    assert len(fhir.searches) == 1
    assert last_audit(matching)["link"] == "matched-stored"


def test_identifiers_as_system_bar_value_strings_are_used(swap, fhir):
    fhir.add("t-1", (SSN, "123-45-6789"))
    r = swap([f"{SSN}|123-45-6789"])
    assert r.status_code == 200 and r.get_json()["patient"] == "t-1"


def test_two_identifiers_finding_the_same_patient_match_it(swap, fhir):
    fhir.add("t-1", (SSN, "1"), (INS, "m-1"))
    r = swap([{"system": SSN, "value": "1"}, {"system": INS, "value": "m-1"}])
    assert r.status_code == 200 and r.get_json()["patient"] == "t-1"
    assert len(fhir.searches) == 2


# -- none and several ----------------------------------------------------------------------
def test_no_match_grants_no_patient_scopes_and_is_remembered_for_ten_minutes(swap, fhir, matching):
    r = swap(ssn(), scope="patient/Observation.rs user/Observation.rs")
    assert r.status_code == 200 and "patient" not in r.get_json()
    assert r.get_json()["scope"] == "user/Observation.rs"
    assert last_audit(matching)["link"] == "none"
    error_of(swap(ssn()), 400, "invalid_scope")  # nothing else left
    assert len(fhir.searches) == 1  # remembered: not searched again
    assert last_audit(matching)["link"] == "none" and links(matching, "--origin", "matched") == []
    swap(ssn("999"))  # other identifiers: another memory key
    assert len(fhir.searches) == 2


def test_the_memory_is_shared_by_instances_through_the_database(swap, fhir, matching, env):
    from token_exchange import create_app
    swap(ssn())
    other = create_app(env=env)
    try:
        error_of(swap(ssn(), client=other.test_client()), 400, "invalid_scope")
    finally:
        other.extensions["token_exchange"].store.close()
        other.extensions["token_exchange"].engine.dispose()
    assert len(fhir.searches) == 1


def test_the_memory_lasts_ten_minutes(swap, fhir, matching, env):
    swap(ssn())
    swap(ssn())
    assert len(fhir.searches) == 1
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    with engine.begin() as conn:
        (expires,) = conn.execute(text("SELECT expires FROM match_memory")).one()
        assert 590 <= expires - time.time() <= 600
        conn.execute(text("UPDATE match_memory SET expires = :e"), {"e": int(time.time()) - 1})
    engine.dispose()
    swap(ssn())
    assert len(fhir.searches) == 2


def test_two_patients_with_the_same_identifier_are_ambiguous_and_nothing_is_linked(swap, fhir, matching):
    fhir.add("t-1", (SSN, "123-45-6789"))
    fhir.add("t-2", (SSN, "123-45-6789"))
    r = swap(ssn(), scope="patient/Observation.rs user/Observation.rs")
    assert r.status_code == 200 and "patient" not in r.get_json()
    assert last_audit(matching)["link"] == "ambiguous" and links(matching, "--origin", "matched") == []
    swap(ssn(), scope="patient/Observation.rs user/Observation.rs")
    assert len(fhir.searches) == 1 and last_audit(matching)["link"] == "ambiguous"


def test_two_identifiers_pointing_at_different_patients_are_ambiguous(swap, fhir, matching):
    fhir.add("t-1", (SSN, "1"))
    fhir.add("t-2", (INS, "m-1"))
    error_of(swap([{"system": SSN, "value": "1"}, {"system": INS, "value": "m-1"}]), 400, "invalid_scope")
    assert last_audit(matching)["link"] == "ambiguous" and links(matching, "--origin", "matched") == []


def _bundle(*entries, total=None, next_link=False):
    b = {"resourceType": "Bundle", "type": "searchset", "entry": list(entries)}
    if total is not None:
        b["total"] = total
    if next_link:
        b["link"] = [{"relation": "next", "url": "http://x/Patient?page=2"}]
    return b


def _entry(pid, system=SSN, value="123-45-6789", mode="match", **extra):
    e = {"resource": {"resourceType": "Patient", "id": pid, "identifier": [{"system": system, "value": value}],
                      **extra}}
    if mode is not None:
        e["search"] = {"mode": mode}
    return e


@pytest.mark.parametrize("bundle, outcome", [
    (_bundle(_entry("t-1", mode=None)), "matched"),  # search.mode absent counts
    (_bundle(_entry("t-1"), _entry("inc", mode="include")), "matched"),  # an include does not count
    (_bundle(_entry("t-1", active=False)), "none"),
    (_bundle(_entry("t-1", active=True)), "matched"),
    (_bundle(_entry("t-1", link=[{"type": "replaced-by", "other": {"reference": "Patient/t-2"}}])), "none"),
    (_bundle(_entry("t-1", link=[{"type": "seealso", "other": {"reference": "Patient/t-2"}}])), "matched"),
    (_bundle(_entry("t-1", value="123-45-6789 ")), "none"),  # the service compares value exactly
    (_bundle(_entry("t-1", system=SSN.upper())), "none"),  # and the system: a target may ignore case
    (_bundle({"resource": {"resourceType": "Observation", "id": "o"}}), "none"),
    (_bundle(_entry("t-1"), total=2), "ambiguous"),  # total above 1
    (_bundle(_entry("t-1"), next_link=True), "ambiguous"),  # a next page
    (_bundle(_entry("t-1"), _entry("t-2", active=False)), "matched"),
    (_bundle(_entry("t-1"), _entry("t-1")), "matched"),  # one Patient twice is one
    (_bundle(), "none"),
])
def test_only_a_matching_active_current_patient_with_exactly_the_identifier_counts(swap, fhir, matching, bundle,
                                                                                  outcome):
    fhir.reply = lambda system, value: bundle
    r = swap(ssn(), scope="patient/Observation.rs user/Observation.rs")
    assert r.status_code == 200
    assert last_audit(matching)["link"] == outcome
    assert r.get_json().get("patient") == ("t-1" if outcome == "matched" else None)


# -- which identifiers -----------------------------------------------------------------------
@pytest.mark.parametrize("ids, why", [
    ([{"system": OTHER, "value": "1"}], "the issuer does not vouch for it"),
    ([{"system": MRN, "value": "1"}], "the target does not list it"),
    ([{"system": SSN, "value": "1", "use": "old"}], "use old"),
    ([{"system": SSN, "value": "1", "period": {"end": "2001-01-01"}}], "ended"),
    ([{"system": SSN, "value": "1", "period": {"end": "2001-01-01T10:00:00Z"}}], "ended"),
    ([{"system": SSN, "value": "1", "period": {"end": "yesterday"}}], "unreadable end"),
    ([{"system": SSN, "value": "1\n2"}], "control character"),
    ([{"system": SSN, "value": "x" * 129}], "too long"),
    ([{"system": SSN, "value": 12345}], "not a string"),
    ([f"{SSN}:1"], "no bar"),
    ({"system": SSN, "value": "1"}, "not an array"),
    (f"{SSN}|1", "not an array"),
])
def test_an_unusable_identifier_is_never_searched_and_nothing_is_remembered(swap, fhir, matching, env, ids, why):
    fhir.add("t-1", (SSN, "1"), (OTHER, "1"), (MRN, "1"))
    error_of(swap(ids), 400, "invalid_scope")
    assert fhir.searches == [], why
    assert last_audit(matching)["link"] == "none"
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM match_memory")).scalar() == 0
    engine.dispose()


def test_usable_identifiers_are_at_most_five_in_order_without_duplicates():
    systems = {SSN, INS}
    raw = ([{"system": SSN, "value": "1"}, f"{SSN}|1", {"system": SSN, "value": "1", "period": {"end": "2999"}}]
           + [f"{INS}|{i}" for i in range(10)])
    assert usable_identifiers(raw, systems) == [Identifier(SSN, "1")] + [Identifier(INS, str(i)) for i in range(4)]
    assert usable_identifiers([{"system": SSN, "value": "1", "period": {"start": "2001"}}], systems) == [
        Identifier(SSN, "1")]
    assert usable_identifiers([f"{SSN}|" + "x" * 128], systems) == [Identifier(SSN, "x" * 128)]


def test_only_five_identifiers_are_searched(swap, fhir):
    error_of(swap([f"{INS}|{i}" for i in range(8)]), 400, "invalid_scope")
    assert [s["identifier"][1] for s in fhir.searches] == ["0", "1", "2", "3", "4"]


def test_identifiers_sent_as_request_parameters_are_ignored(swap, fhir, matching):
    fhir.add("t-1", (SSN, "1"))
    error_of(swap(None, patient_identifier=f"{SSN}|1", identifier=f"{SSN}|1"), 400, "invalid_scope")
    assert fhir.searches == []


def test_identifiers_of_another_token_than_the_one_that_supplied_the_patient_are_ignored(http, ehr, fhir, matching):
    """The ID token supplies the patient; identifiers in the access token are never merged in."""
    fhir.add("t-1", (SSN, "1"))
    r = post_token(http, {"grant_type": TE, "subject_token": ehr.access_token(patient_identifier=[f"{SSN}|1"]),
                          "subject_token_type": AT, "actor_token": ehr.id_token(), "actor_token_type": IDT,
                          "resource": fhir.base, "scope": "patient/Observation.rs"})
    error_of(r, 400, "invalid_scope")
    assert fhir.searches == []


def test_the_access_token_s_identifiers_serve_when_it_supplied_the_patient(http, ehr, fhir, matching):
    fhir.add("t-1", (SSN, "1"))
    at = ehr.access_token(patient="a-123", patient_identifier=[f"{SSN}|1"])
    r = post_token(http, {"grant_type": TE, "subject_token": at, "subject_token_type": AT, "resource": fhir.base,
                          "scope": "patient/Observation.rs"})
    assert r.status_code == 200 and r.get_json()["patient"] == "t-1"


def test_an_introspection_answer_s_identifiers_serve_when_it_supplied_the_patient(http, ehr, fhir, matching):
    fhir.add("t-1", (SSN, "1"))
    ehr.opaque["opaque-1"] = {"active": True, "sub": "user-1", "client_id": UPSTREAM, "scope": "patient/*.rs",
                              "patient": "a-123", "patient_identifier": [f"{SSN}|1"],
                              "exp": int(time.time()) + 300}
    r = post_token(http, {"grant_type": TE, "subject_token": "opaque-1", "subject_token_type": AT,
                          "resource": fhir.base, "scope": "patient/Observation.rs"})
    assert r.status_code == 200 and r.get_json()["patient"] == "t-1"


def test_the_jwt_grant_s_identifiers_serve(http, ehr, fhir, matching):
    fhir.add("t-1", (SSN, "1"))
    matching("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", fhir.base,
             "--allow-jwt-grant")
    r = post_token(http, {"grant_type": JWT_BEARER, "assertion": make_grant(ehr, patient_identifier=[f"{SSN}|1"]),
                          "resource": fhir.base, "scope": "patient/Observation.rs"})
    assert r.status_code == 200 and r.get_json()["patient"] == "t-1"
    assert last_audit(matching)["link"] == "matched" and last_audit(matching)["grant"] == "jwt-bearer"


def test_a_custom_identifier_claim_is_read(swap, fhir, matching, ehr):
    matching("issuer", "update", ehr.issuer, "--identifier-claim", "ids")
    fhir.add("t-1", (SSN, "1"))
    r = swap(None, id_extra={"ids": [f"{SSN}|1"], "patient_identifier": [f"{SSN}|2"]})
    assert r.status_code == 200 and r.get_json()["patient"] == "t-1"


# -- stored rows win -------------------------------------------------------------------------
def test_a_table_link_always_wins_and_nothing_is_searched(swap, fhir, matching):
    fhir.add("t-1", (SSN, "1"))
    matching("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", fhir.base,
             "--target-patient", "table-9")
    r = swap([f"{SSN}|1"])
    assert r.status_code == 200 and r.get_json()["patient"] == "table-9"
    assert fhir.searches == [] and last_audit(matching)["link"] == "table"


def test_a_blocked_patient_is_never_matched(swap, fhir, matching):
    fhir.add("t-1", (SSN, "1"))
    matching("link", "block", "--source", SOURCE, "--patient", "a-123", "--target", fhir.base)
    error_of(swap([f"{SSN}|1"]), 400, "invalid_scope")
    assert fhir.searches == [] and last_audit(matching)["link"] == "none"


def test_a_target_not_set_up_for_matching_is_never_searched(swap, fhir, matching):
    matching("target", "update", fhir.base, "--match-identifier", "")
    fhir.add("t-1", (SSN, "1"))
    error_of(swap([f"{SSN}|1"]), 400, "invalid_scope")
    assert fhir.searches == []


def test_link_add_replaces_a_matched_link(swap, fhir, matching):
    fhir.add("t-1", (SSN, "1"))
    assert swap([f"{SSN}|1"]).status_code == 200
    matching("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", fhir.base, "--target-patient", "x")
    assert swap([f"{SSN}|1"]).get_json()["patient"] == "x"


def _age_matched_links(env, days):
    from token_exchange.models import PatientLink
    from token_exchange.store import utcnow
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(update(PatientLink).where(PatientLink.origin == "matched")
                     .values(matched_at=utcnow() - timedelta(days=days)))
    engine.dispose()


def test_after_the_match_ttl_a_matched_link_is_matched_again_and_replaced(swap, fhir, matching, env):
    matching("target", "update", fhir.base, "--match-ttl", "7")
    fhir.add("t-1", (SSN, "1"))
    assert swap([f"{SSN}|1"]).get_json()["patient"] == "t-1"
    _age_matched_links(env, 6)
    assert swap([f"{SSN}|1"]).get_json()["patient"] == "t-1" and len(fhir.searches) == 1  # within the TTL
    _age_matched_links(env, 8)
    fhir.patients = []
    fhir.add("t-7", (SSN, "1"))  # the target merged its records meanwhile
    r = swap([f"{SSN}|1"])
    assert r.get_json()["patient"] == "t-7" and len(fhir.searches) == 2
    (row,) = links(matching, "--origin", "matched")
    assert row["target_patient"] == "t-7" and last_audit(matching)["link"] == "matched"


def test_after_the_match_ttl_no_match_deletes_the_matched_link(swap, fhir, matching, env):
    fhir.add("t-1", (SSN, "1"))
    assert swap([f"{SSN}|1"]).status_code == 200
    _age_matched_links(env, 31)
    fhir.patients = []
    error_of(swap([f"{SSN}|1"]), 400, "invalid_scope")
    assert links(matching, "--origin", "matched") == [] and last_audit(matching)["link"] == "none"
    assert any(e["action"] == "link.unmatch" for e in admin_events(matching))


def test_two_simultaneous_first_exchanges_store_one_link(swap, fhir, matching, app):
    fhir.add("t-1", (SSN, "1"))
    fhir.gate = threading.Barrier(2)  # each search waits for the other: both exchanges search before either stores
    results = []

    def one():
        results.append(swap([f"{SSN}|1"], client=app.test_client()))
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200, 200]
    assert {r.get_json()["patient"] for r in results} == {"t-1"}
    assert len(fhir.searches) == 2 and len(links(matching, "--origin", "matched")) == 1
    assert len([e for e in admin_events(matching) if e["action"] == "link.match"]) == 1


# -- failures: 503 -------------------------------------------------------------------------------
@pytest.fixture
def lines():
    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.setFormatter(JSONFormatter())
            self.records = []

        def emit(self, record):
            self.records.append(json.loads(self.format(record)))
    h = Lines()
    logger = logging.getLogger("token_exchange.matching")
    logger.addHandler(h)
    yield h.records
    logger.removeHandler(h)


@pytest.mark.parametrize("fault, status", [(500, 500), (401, 401), (403, 403), (404, 404), (503, 503),
                                           ("garbage", 200), ("not-searchset", 200)])
def test_a_target_that_answers_anything_but_a_searchset_is_503_and_nothing_is_stored(swap, fhir, matching, http,
                                                                                    lines, env, fault, status):
    fhir.add("t-1", (SSN, "1"))
    fhir.fault = fault
    before = metric(http, "match_failures")
    r = swap([f"{SSN}|1"])
    body = error_of(r, 503, "temporarily_unavailable")
    assert r.headers["Retry-After"] == "30" and "target" in body["error_description"]
    assert last_audit(matching)["link"] == "unavailable" and last_audit(matching)["error"] == "temporarily_unavailable"
    assert links(matching, "--origin", "matched") == []
    (line,) = [rec for rec in lines if rec["msg"] == "patient matching unavailable"]
    assert line["target"] == fhir.base and line["status"] == status
    assert metric(http, "match_failures") == before + 1
    fhir.fault = None  # nothing was remembered either: the next exchange searches and links
    assert swap([f"{SSN}|1"]).get_json()["patient"] == "t-1"


@pytest.mark.parametrize("bundle", [
    {"resourceType": "Bundle", "type": "searchset", "total": "1"},
    {"resourceType": "Bundle", "type": "searchset", "entry": {"resource": {}}},
    {"resourceType": "Bundle", "type": "searchset", "entry": [{"fullUrl": "x"}]},
    {"resourceType": "Bundle", "type": "searchset", "entry": [_entry("bad/id", value="1")]},
    {"resourceType": "Bundle", "type": "searchset", "link": "next"},
    {"resourceType": "OperationOutcome"},
    [],
])
def test_a_malformed_searchset_is_503(swap, fhir, matching, bundle):
    fhir.reply = lambda system, value: bundle
    error_of(swap([f"{SSN}|1"]), 503, "temporarily_unavailable")
    assert last_audit(matching)["link"] == "unavailable"


@pytest.mark.parametrize("pid", ["..", "."])
def test_a_target_patient_id_that_is_a_dot_segment_is_malformed_never_linked(swap, fhir, matching, pid):
    """FHIR's id pattern allows '..', but a SMART app building {base}/Patient/.. would name
    another resource: such an answer is malformed (503), and nothing is stored."""
    fhir.reply = lambda system, value: _bundle(_entry(pid, value="1"))
    error_of(swap([f"{SSN}|1"]), 503, "temporarily_unavailable")
    assert links(matching, "--origin", "matched") == []


def test_a_429_passes_the_target_s_retry_after_on(swap, fhir):
    fhir.fault, fhir.retry_after = 429, "120"
    r = swap([f"{SSN}|1"])
    error_of(r, 503, "temporarily_unavailable")
    assert r.headers["Retry-After"] == "120"


@pytest.mark.parametrize("header, seconds", [("\u00b2", "30"), ("\u0661\u0662", "30"), ("1\u00b2", "30"),
                                             ("+5", "30"), ("1e3", "30"), ("0x10", "30"),
                                             ("Mon, 99 Foo 9999 99:99:99 GMT", "30"),
                                             ("Fri, 31 Dec 9999 23:59:59 GMT", "3600")])
def test_a_429_with_a_retry_after_that_is_not_ascii_digits_or_a_date_is_a_503_with_its_audit_record(
        swap, fhir, matching, header, seconds):
    """RFC 9110 §10.2.3: delay-seconds is 1*DIGIT (ASCII) or an HTTP-date; anything else
    is read as no Retry-After (30 s), never a 500, and the refusal keeps its audit record."""
    fhir.fault, fhir.retry_after = 429, header
    r = swap([f"{SSN}|1"])
    error_of(r, 503, "temporarily_unavailable")
    assert r.headers["Retry-After"] == seconds
    assert last_audit(matching)["link"] == "unavailable"


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_retry_after_never_raises_and_stays_within_bounds(value):
    seconds = fhir_client.retry_after(value)
    assert isinstance(seconds, int) and 1 <= seconds <= 3600


def test_retry_after_reads_seconds_or_an_http_date_within_bounds():
    from datetime import datetime, timezone
    from email.utils import format_datetime
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=600), usegmt=True)
    assert fhir_client.retry_after("120") == 120
    assert 590 <= fhir_client.retry_after(later) <= 600
    assert fhir_client.retry_after("0") == 1 and fhir_client.retry_after("9" * 40) == 3600
    assert fhir_client.retry_after(None) == fhir_client.retry_after("soon") == fhir_client.retry_after("-5") == 30


def test_a_target_that_is_down_is_503(swap, matching, ehr, lines):
    down = f"http://127.0.0.1:{free_port()}/fhir"
    matching("target", "add", down, "--match-identifier", SSN)
    matching("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", down,
             "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
    r = swap([f"{SSN}|1"], resource=down)
    error_of(r, 503, "temporarily_unavailable")
    assert r.headers["Retry-After"] == "30"
    (line,) = [rec for rec in lines if rec["msg"] == "patient matching unavailable"]
    assert line["target"] == down and line["status"] is None and "transport" in line["reason"]


def test_a_slow_target_is_cut_off_at_the_deadline_shared_by_all_searches(env, matching, ehr, fhir):
    from token_exchange import create_app
    app = create_app(env=dict(env, TOKEN_EXCHANGE_HTTP_TIMEOUT="1"))
    fhir.fault = "hang"
    try:
        started = time.monotonic()
        r = post_token(app.test_client(), {
            "grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
            "actor_token": ehr.id_token(patient_identifier=[f"{SSN}|1", f"{INS}|2", f"{SSN}|3"]),
            "actor_token_type": IDT, "resource": fhir.base, "scope": "patient/Observation.rs"})
        elapsed = time.monotonic() - started
    finally:
        fhir.release()
        app.extensions["token_exchange"].store.close()
        app.extensions["token_exchange"].engine.dispose()
    error_of(r, 503, "temporarily_unavailable")
    assert len(fhir.searches) == 1  # the deadline was spent on the first search; no other was started
    assert elapsed < 1 + 3, elapsed  # one deadline of 1 s, with a margin for a loaded machine
    assert last_audit(matching)["link"] == "unavailable"


# -- the EHR's Patient read (SMART Backend Services) ------------------------------------------------
@pytest.fixture
def backend(matching, ehr, http):
    """The issuer reads source Patients at its FHIR server with Backend Services; the
    EHR checks the service's client assertions against the service's /jwks."""
    b = ehr.backend
    b.reset()
    b.client_id = "te-at-ehr"
    b.client_jwks = lambda: http.get("/jwks").get_json()
    matching("issuer", "update", ehr.issuer, "--source", SOURCE, "--source", b.fhir_base,
             "--fhir-client-id", "te-at-ehr")
    yield b
    b.reset()


def ehr_patient(pid, *identifiers):
    return {"resourceType": "Patient", "id": pid, "identifier": [{"system": s, "value": v} for s, v in identifiers]}


def test_without_identifiers_in_the_token_the_source_patient_is_read_with_a_backend_services_token(
        swap, fhir, backend, http, matching):
    backend.patients["a-123"] = ehr_patient("a-123", (MRN, "m"), (SSN, "1"))
    fhir.add("t-1", (SSN, "1"))
    r = swap(None, id_extra={"source": backend.fhir_base})
    assert r.status_code == 200 and r.get_json()["patient"] == "t-1", r.get_json()
    (req,) = backend.token_requests
    assert req["header"]["alg"] in ("RS384", "ES384") and req["header"]["kid"] in jwks(http)
    assert req["claims"]["iss"] == req["claims"]["sub"] == "te-at-ehr"
    assert req["claims"]["aud"] == backend.token_endpoint  # found by discovery
    assert req["claims"]["exp"] - time.time() <= 300 and req["scope"] == "system/Patient.rs"
    assert backend.reads == [{"path": "/ehr-a/fhir/Patient/a-123", "authorized": True}]
    assert [s["identifier"] for s in fhir.searches] == [(SSN, "1")]  # MRN: the target does not list it
    (row,) = links(matching, "--origin", "matched")
    assert row["source"] == backend.fhir_base


def test_the_backend_services_token_is_cached_until_near_its_expiry(swap, fhir, backend, monkeypatch, matching, ehr):
    matching("issuer", "update", ehr.issuer, "--token-endpoint", backend.token_endpoint, "--fhir-scope",
             "system/Patient.r")
    for pid in ("p1", "p2", "p3"):
        backend.patients[pid] = ehr_patient(pid, (SSN, pid))
    fhir.add("t-1", (SSN, "p1"))
    clock = [time.monotonic()]
    monkeypatch.setattr(fhir_client, "time", type("Clock", (), {"monotonic": lambda: clock[0], "time": time.time}))
    assert swap(None, id_extra={"source": backend.fhir_base, "patient": "p1"}).get_json()["patient"] == "t-1"
    clock[0] += 300 - 61  # still more than the margin (60 s) left
    swap(None, id_extra={"source": backend.fhir_base, "patient": "p2"})
    assert len(backend.token_requests) == 1 and len(backend.reads) == 2
    assert backend.token_requests[0]["scope"] == "system/Patient.r"
    assert backend.token_requests[0]["claims"]["aud"] == backend.token_endpoint  # the registered endpoint
    clock[0] += 2  # now within the margin: a new token
    swap(None, id_extra={"source": backend.fhir_base, "patient": "p3"})
    assert len(backend.token_requests) == 2 and len(backend.reads) == 3
    assert all(r["authorized"] for r in backend.reads)


def test_identifiers_in_the_token_spare_the_ehr_read(swap, fhir, backend):
    fhir.add("t-1", (SSN, "1"))
    r = swap([f"{SSN}|1"], id_extra={"source": backend.fhir_base})
    assert r.get_json()["patient"] == "t-1" and backend.reads == [] and backend.token_requests == []


@pytest.mark.parametrize("where, fault", [("token", 500), ("token", 400), ("token", 429), ("read", 500),
                                          ("read", 404), ("read", 403)])
def test_an_ehr_that_cannot_be_asked_is_503(swap, fhir, backend, matching, lines, where, fault):
    backend.patients["a-123"] = ehr_patient("a-123", (SSN, "1"))
    setattr(backend, f"{where}_fault", fault)
    r = swap(None, id_extra={"source": backend.fhir_base})
    body = error_of(r, 503, "temporarily_unavailable")
    assert "EHR" in body["error_description"] and r.headers["Retry-After"] == "30"
    assert fhir.searches == [] and last_audit(matching)["link"] == "unavailable"
    (line,) = [rec for rec in lines if rec["msg"] == "patient matching unavailable"]
    assert line["party"] == "EHR" and line["target"] == fhir.base and line["status"] == fault


def test_a_patient_read_refused_with_401_drops_the_cached_token(swap, fhir, backend):
    backend.patients["a-123"] = ehr_patient("a-123", (SSN, "1"))
    fhir.add("t-1", (SSN, "1"))
    backend.read_fault = 401
    error_of(swap(None, id_extra={"source": backend.fhir_base}), 503, "temporarily_unavailable")
    backend.read_fault = None
    assert swap(None, id_extra={"source": backend.fhir_base}).get_json()["patient"] == "t-1"
    assert len(backend.token_requests) == 2  # not the token the EHR refused


def test_a_patient_read_naming_another_patient_is_503(swap, fhir, backend):
    backend.patients["a-123"] = ehr_patient("someone-else", (SSN, "1"))
    error_of(swap(None, id_extra={"source": backend.fhir_base}), 503, "temporarily_unavailable")


@pytest.mark.parametrize("pid", ["..", ".", "a/../b", "../Patient/x"])
def test_a_source_patient_id_that_is_a_dot_segment_or_has_a_slash_is_never_read_at_the_ehr(matching, fhir, backend,
                                                                                          ehr, pid):
    """Issue 26: `..` and `.` match FHIR's id pattern, but a client removes them as dot
    segments (RFC 3986 §5.2.4; %2E is the same character) and would read {source}/ instead
    of the Patient; an id with a slash is no FHIR id. Neither is read."""
    backend.patients[pid] = ehr_patient(pid, (SSN, "1"))
    fhir.add("t-1", (SSN, "1"))
    out = json.loads(matching("link", "match", "--source", backend.fhir_base, "--patient", pid, "--target",
                              fhir.base, "--json", "--dry-run").output)
    assert backend.reads == [] and [e for e, _, _ in ehr.requests_seen if e.startswith("fhir")] == []
    assert out["decision"] == "none" and fhir.searches == []


def test_an_ehr_patient_without_usable_identifiers_searches_nothing(swap, fhir, backend):
    backend.patients["a-123"] = ehr_patient("a-123", (MRN, "m"))
    error_of(swap(None, id_extra={"source": backend.fhir_base}), 400, "invalid_scope")
    assert fhir.searches == [] and len(backend.reads) == 1


# -- explain, CLI, audit -------------------------------------------------------------------------
def test_explain_searches_and_writes_nothing_and_says_what_would_happen(matching, fhir, ehr, tmp_path):
    fhir.add("t-1", (SSN, "1"))
    at, idt = tmp_path / "at", tmp_path / "idt"
    at.write_text(ehr.access_token())
    idt.write_text(ehr.id_token(patient_identifier=[f"{SSN}|1"]))
    r = matching("explain", "--client", "vendor", "--subject-token", str(at), "--actor-token", str(idt),
                 "--resource", fhir.base, "--scope", "patient/Observation.rs user/Observation.rs", "--json")
    report = json.loads(r.output)
    (step,) = [s for s in report["steps"] if s["step"] == "patient (rule 7)"]
    assert "would search the target for 1 identifier(s) of " + SSN in step["detail"]
    assert fhir.searches == [] and links(matching, "--origin", "matched") == []
    assert not [e for e in admin_events(matching) if e["action"].startswith("match")]


def test_link_match_matches_now_and_prints_the_decision(matching, fhir):
    fhir.add("t-1", (SSN, "1"))
    r = matching("link", "match", "--source", SOURCE, "--patient", "a-123", "--target", "matching-b",
                 "--identifier", f"{SSN}|1", "--json")
    out = json.loads(r.output)
    assert out["decision"] == "matched" and out["target_patient"] == "t-1" and out["stored"] is True
    assert out["system"] == SSN and out["searched"] == [SSN]
    (row,) = links(matching, "--origin", "matched")
    assert row["target_patient"] == "t-1"
    events = admin_events(matching)
    assert any(e["action"] == "link.match" and e["actor"] == "test-admin" for e in events)
    text_out = matching("link", "match", "--source", SOURCE, "--patient", "a-123", "--target", "matching-b",
                        "--identifier", f"{SSN}|1").output
    assert "decision: matched" in text_out and "target_patient: t-1" in text_out


def test_link_match_dry_run_searches_and_stores_nothing(matching, fhir):
    fhir.add("t-1", (SSN, "1"))
    out = json.loads(matching("link", "match", "--source", SOURCE, "--patient", "a-123", "--target", fhir.base,
                              "--identifier", f"{SSN}|1", "--dry-run", "--json").output)
    assert out["decision"] == "matched" and out["target_patient"] == "t-1" and out["stored"] is False
    assert len(fhir.searches) == 1 and links(matching, "--origin", "matched") == []


def test_link_match_ignores_the_ten_minute_memory(swap, matching, fhir):
    error_of(swap([f"{SSN}|1"]), 400, "invalid_scope")  # none, remembered
    fhir.add("t-1", (SSN, "1"))
    out = json.loads(matching("link", "match", "--source", SOURCE, "--patient", "a-123", "--target", fhir.base,
                              "--identifier", f"{SSN}|1", "--json").output)
    assert out["decision"] == "matched" and len(fhir.searches) == 2
    assert swap([f"{SSN}|1"]).get_json()["patient"] == "t-1"


@pytest.mark.parametrize("patients, decision", [([], "none"), ([("t-1", "1"), ("t-2", "1")], "ambiguous")])
def test_link_match_exits_0_for_none_and_ambiguous(matching, fhir, patients, decision):
    for pid, value in patients:
        fhir.add(pid, (SSN, value))
    r = matching("link", "match", "--source", SOURCE, "--patient", "a-123", "--target", fhir.base,
                 "--identifier", f"{SSN}|1", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["decision"] == decision


def test_link_match_rematches_a_matched_link_and_leaves_a_table_link(matching, fhir):
    fhir.add("t-1", (SSN, "1"))
    args = ("link", "match", "--source", SOURCE, "--patient", "a-123", "--target", fhir.base, "--identifier",
            f"{SSN}|1", "--json")
    matching(*args)
    fhir.patients = []
    assert json.loads(matching(*args).output)["decision"] == "none"
    assert links(matching, "--origin", "matched") == []  # the new outcome replaced the row
    matching("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", fhir.base, "--target-patient", "x")
    out = json.loads(matching(*args).output)
    assert out["decision"] == "table" and out["target_patient"] == "x" and len(fhir.searches) == 2


def test_link_match_exits_1_with_one_error_line_when_the_target_cannot_be_asked(matching, fhir):
    fhir.fault = 500
    r = matching("link", "match", "--source", SOURCE, "--patient", "a-123", "--target", fhir.base,
                 "--identifier", f"{SSN}|1", check=False)
    assert r.exit_code == 1 and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith("error: could not ask the target at " + fhir.base) and "500" in line


def test_link_match_reads_the_ehr_without_identifiers(matching, fhir, backend):
    backend.patients["a-9"] = ehr_patient("a-9", (SSN, "9"))
    fhir.add("t-9", (SSN, "9"))
    out = json.loads(matching("link", "match", "--source", backend.fhir_base, "--patient", "a-9", "--target",
                              fhir.base, "--json").output)
    assert out["decision"] == "matched" and out["target_patient"] == "t-9" and len(backend.reads) == 1


@pytest.mark.parametrize("args, message", [
    (("--identifier", f"{MRN}|1"), "is not one the issuer"),
    (("--identifier", "no-bar"), "SYSTEM|VALUE"),
    (("--identifier", f"{SSN}|" + "x" * 129), "1-128 characters"),
    ((), "give --identifier"),
])
def test_link_match_refuses_what_it_cannot_search(matching, fhir, args, message):
    r = matching("link", "match", "--source", SOURCE, "--patient", "a-123", "--target", fhir.base, *args,
                 check=False)
    assert r.exit_code == 1 and message in r.stderr and fhir.searches == []


def test_link_match_refuses_a_target_not_set_up_for_matching(matching, fhir):
    r = matching("link", "match", "--source", SOURCE, "--patient", "a-123", "--target", TARGET, "--identifier",
                 f"{SSN}|1", check=False)
    assert r.exit_code == 1 and "not set up for matching" in r.stderr


def test_the_fhir_audit_export_shows_how_the_patient_was_mapped(swap, fhir, matching):
    fhir.add("t-1", (SSN, "1"))
    swap([f"{SSN}|1"])
    bundle = json.loads(matching("audit", "export", "--format", "fhir").output)
    ev = bundle["entry"][-1]["resource"]
    details = {d["type"]: d["valueString"] for ent in ev["entity"] for d in ent.get("detail", [])}
    assert details["patient-mapping"] == "matched"
    assert any(ent.get("description") == "target patient (mapped by a matched link)" for ent in ev["entity"])


def test_jwks_and_discovery_answer_at_once_while_an_exchange_waits_on_a_slow_target(matching, fhir, ehr, env,
                                                                                     tmp_path):
    """Under `token-exchange serve` with one worker: a target fetching the keys to verify
    the search token must never wait behind the exchange that is searching it."""
    import os
    import signal
    import subprocess

    import requests

    from test_scaleout import BIN
    fhir.fault = "hang"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "token-exchange"), "serve", "--port", str(port), "--workers", "1"],
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.1)  # polling the start
        answers = []
        waiting = threading.Thread(target=lambda: answers.append(requests.post(
            base + "/token", auth=("vendor", VENDOR_SECRET), timeout=30, data={
                "grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
                "actor_token": ehr.id_token(patient_identifier=[f"{SSN}|1"]), "actor_token_type": IDT,
                "resource": fhir.base, "scope": "patient/Observation.rs"})))
        waiting.start()
        assert fhir.arrived.wait(20), "the exchange never searched"
        for path in ("/jwks", "/.well-known/oauth-authorization-server", "/.well-known/smart-configuration"):
            started = time.monotonic()
            r = requests.get(base + path, timeout=3)
            assert r.status_code == 200 and time.monotonic() - started < 2, path
        assert waiting.is_alive()  # the exchange was still waiting on the target all along
        fhir.release()
        waiting.join(30)
        assert answers[0].status_code == 503 and answers[0].json()["error"] == "temporarily_unavailable"
    finally:
        fhir.release()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def test_without_a_covering_consent_nothing_is_matched(swap, fhir, matching, ehr):
    """Contract: check order ... scopes; consent; patient (rule 7, including matching)."""
    fhir.add("t-1", (SSN, "1"))
    matching("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", fhir.base,
             "--consent", "required")
    r = swap([f"{SSN}|1"])
    assert r.status_code == 400 and r.get_json()["error"] == "consent_required"
    assert fhir.searches == [] and links(matching, "--origin", "matched") == []


def test_link_import_replaces_matched_links_and_keeps_table_links_refused(matching, fhir, tmp_path):
    fhir.add("t-1", (SSN, "1"))
    matching("link", "match", "--source", SOURCE, "--patient", "a-123", "--target", "matching-b",
             "--identifier", f"{SSN}|1")
    path = tmp_path / "links.csv"
    path.write_text("\n".join(["source,patient,target,target_patient", f"{SOURCE},a-123,{fhir.base},t-9",
                               f"{SOURCE},a-7,matching-b,t-7", f"{SOURCE},a-8,{TARGET},b-8"]) + "\n")
    assert matching("link", "import", str(path)).output == "imported 3 links (1 replaced matched links)\n"
    rows = {(r["patient"], r["target"]): (r["target_patient"], r["origin"]) for r in links(matching)}
    assert rows[("a-123", fhir.base)] == ("t-9", "table")
    assert rows[("a-7", fhir.base)] == ("t-7", "table") and rows[("a-8", TARGET)] == ("b-8", "table")
    assert links(matching, "--origin", "matched") == []


def test_link_import_looks_stored_links_up_by_index_not_by_scanning_the_table():
    """A row-value IN list is a full scan on SQLite: over a million stored links each
    batch of an import would read the whole table."""
    from sqlalchemy import create_engine, event

    from token_exchange.store.admin import LinkImport

    def _stored(conn, batch):
        return LinkImport(conn).stored(batch)
    from token_exchange.models import Base
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    plans = []

    @event.listens_for(engine, "before_cursor_execute")
    def explain(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and "patient_link" in statement:
            plans.append(" ".join(r[3] for r in cursor.connection.execute("EXPLAIN QUERY PLAN " + statement,
                                                                           parameters)))

    batch = [(n, {"source": s, "patient": f"p-{n}", "target_id": t}) for n, (s, t) in
             enumerate([("https://a.example/fhir", 1), ("https://a.example/fhir", 2), ("https://c.example/fhir", 1)])]
    with engine.begin() as conn:
        assert _stored(conn, batch) == {}
    assert len(plans) == 3 and all("USING INDEX" in p and "SCAN patient_link" not in p for p in plans), plans


def test_exchanges_beyond_the_search_slots_get_an_immediate_503_and_jwks_never_waits_behind_them(
        matching, fhir, ehr, env, tmp_path):
    """Issue 'Hardening III' 3: one worker with 4 threads, 8 concurrent first exchanges and a
    target that fetches our /jwks to verify the search token before it answers. At most
    TOKEN_EXCHANGE_MATCH_CONCURRENCY (default: threads - 2) exchanges may wait on the target;
    the rest are refused at once (503, Retry-After), so threads stay free for /jwks."""
    import os
    import signal
    import subprocess

    import requests

    from test_scaleout import BIN, until
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    for n in range(8):
        fhir.add(f"t-{n}", (SSN, str(n)))
    fetched = []

    def verify_then_search(system, value):  # as a target verifying the search token would
        try:
            fetched.append(requests.get(base + "/jwks", timeout=8).status_code)
        except requests.RequestException as e:
            fetched.append(type(e).__name__)
        hit = next(p for p in fhir.patients if p["identifier"][0]["value"] == value)
        return {"resourceType": "Bundle", "type": "searchset", "total": 1,
                "entry": [{"resource": hit, "search": {"mode": "match"}}]}
    fhir.reply = verify_then_search
    fhir.gate = threading.Event()
    serve_env = {**os.environ, **env, "TOKEN_EXCHANGE_WORKER_THREADS": "4", "TOKEN_EXCHANGE_HTTP_TIMEOUT": "15"}
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "token-exchange"), "serve", "--port", str(port), "--workers", "1"],
                                env=serve_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    answers, lock = [], threading.Lock()

    def exchange(n):
        try:
            r = requests.post(base + "/token", auth=("vendor", VENDOR_SECRET), timeout=30, data={
                "grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
                "actor_token": ehr.id_token(patient=f"a-{n}", patient_identifier=[f"{SSN}|{n}"]),
                "actor_token_type": IDT, "resource": fhir.base, "scope": "patient/Observation.rs"})
            answer = (r.status_code, r.json(), r.headers.get("Retry-After"))
        except requests.RequestException as e:
            answer = (None, type(e).__name__, None)
        with lock:
            answers.append(answer)
    try:
        assert until(30, lambda: _ready(base)), "serve did not start"
        threads = [threading.Thread(target=exchange, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        # every exchange either searches (held at the target) or has its answer already
        settled = until(10, lambda: len(answers) + len(fhir.searches) == 8)
        outside = requests.get(base + "/jwks", timeout=3)  # with searches held at the target
        fhir.gate.set()
        for t in threads:
            t.join(40)
        assert settled, f"{len(fhir.searches)} searching, {len(answers)} answered: the rest queued behind them"
        assert outside.status_code == 200
        assert fetched and all(code == 200 for code in fetched), fetched
        granted = [a for a in answers if a[0] == 200]
        busy = [a for a in answers if a[0] == 503]
        assert len(granted) == len(fhir.searches) == 2 and len(busy) == 6, answers
        assert all(a[1]["error"] == "temporarily_unavailable" and a[2] for a in busy)
        assert all("busy" in a[1]["error_description"] for a in busy)
    finally:
        fhir.gate.set()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def _ready(base):
    import requests
    try:
        return requests.get(base + "/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.parametrize("env_over, expected", [
    ({}, 6), ({"TOKEN_EXCHANGE_WORKER_THREADS": "4"}, 2), ({"TOKEN_EXCHANGE_WORKER_THREADS": "2"}, 1),
    ({"TOKEN_EXCHANGE_WORKER_THREADS": "1"}, 1), ({"TOKEN_EXCHANGE_MATCH_CONCURRENCY": "3"}, 3)])
def test_match_concurrency_defaults_to_threads_minus_two_and_at_least_one(env, env_over, expected):
    from token_exchange.settings import Settings
    assert Settings.from_env(dict(env, **env_over)).match_concurrency == expected


@pytest.mark.parametrize("value", ["0", "9", "x"])
def test_match_concurrency_outside_one_to_the_thread_count_refuses_to_start(env, value):
    from token_exchange.settings import Settings, SettingsError
    with pytest.raises(SettingsError, match="TOKEN_EXCHANGE_MATCH_CONCURRENCY"):
        Settings.from_env(dict(env, TOKEN_EXCHANGE_MATCH_CONCURRENCY=value))
