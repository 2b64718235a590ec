"""Patient matching against a real FHIR search implementation: Medplum's FHIR router
and in-memory repository (tests/fhir_server) as the target, verifying the service's
self-minted search token with the service's own /jwks fetched over HTTP, as a
resource server would. The service runs on a real loopback HTTP server (werkzeug,
threaded); exchanges go over HTTP too. Medplum's search quirks (case-insensitive
tokens, an escaped `|` not honoured, `total` always set, `entry` absent when empty)
meet the service's own exact checks here."""
from __future__ import annotations

import json
import threading

import pytest
import requests
from werkzeug.serving import make_server

from conftest import AT, IDT, SERVICE, TE, VENDOR_SECRET, audit_rows
from fakes import SOURCE, UPSTREAM
from fhirserver import require_all, unavailable

if unavailable() and not require_all():
    pytest.skip(unavailable(), allow_module_level=True)

SSN = "urn:oid:2.16.840.1.113883.4.1"
INS = "urn:example:insurer-member"
SEARCH_CLAIMS = {"iss", "aud", "sub", "client_id", "scope", "iat", "exp", "jti"}


class ServedApp:
    """The service on loopback over real HTTP; each test plugs its own app in."""

    def __init__(self):
        self.app = None
        self.server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _wsgi(self, environ, start_response):
        return self.app(environ, start_response)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def servers():
    """One served app per database backend: each backend's template holds its own
    signing key, and Medplum, like any resource server, caches the JWKS it fetched
    (refetching an unknown kid at most every 30 s), so each backend gets its own
    JWKS URL and its own Medplum server."""
    running = {}
    yield running
    for s in running.values():
        s.stop()


@pytest.fixture
def service(servers, env, world):
    from token_exchange import create_app
    served = servers.setdefault(env["TOKEN_EXCHANGE_DATABASE_URL"].split(":", 1)[0], ServedApp())
    served.app = create_app(env=env)
    yield served
    served.app.extensions["token_exchange"].store.close()
    served.app.extensions["token_exchange"].engine.dispose()
    served.app = None


@pytest.fixture
def medplum(fhir_server_factory, service):
    """The target: trusts tokens from this service (iss) verified with its /jwks over HTTP."""
    return fhir_server_factory(jwks_url=service.url + "/jwks", issuer=SERVICE)


@pytest.fixture
def matching(world, ehr, medplum, service):
    world("issuer", "update", ehr.issuer, "--identifier-system", SSN, "--identifier-system", INS)
    world("target", "add", medplum.base, "--name", "medplum", "--match-identifier", SSN, "--match-identifier", INS)
    world("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", medplum.base,
          "--scopes", "patient/*.rs user/*.rs", "--upstream-client-id", UPSTREAM)
    return world


def exchange(service, ehr, target, ids=None, scope="patient/Observation.rs", **id_extra):
    if ids is not None:
        id_extra["patient_identifier"] = ids
    return requests.post(service.url + "/token", auth=("vendor", VENDOR_SECRET), timeout=30, data={
        "grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
        "actor_token": ehr.id_token(**id_extra), "actor_token_type": IDT, "resource": target, "scope": scope})


def patient(pid, *identifiers, **extra):
    return {"resourceType": "Patient", "id": pid,
            "identifier": [{"system": s, "value": v} for s, v in identifiers], **extra}


def seed(medplum, *patients):
    medplum.seed({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": p} for p in patients]})


def searches(medplum):
    return [r for r in medplum.requests() if r["path"].startswith("/fhir/Patient?")]


def link_of(world):
    return audit_rows(world)[-1]["link"]


def test_one_match_at_medplum_links_the_patient_with_a_token_medplum_verified(matching, medplum, service, ehr):
    seed(medplum, patient("t-1", (SSN, "123-45-6789")), patient("decoy", (SSN, "999")))
    r = exchange(service, ehr, medplum.base, [{"system": SSN, "value": "123-45-6789"}])
    assert r.status_code == 200, r.text
    assert r.json()["patient"] == "t-1" and r.json()["scope"] == "patient/Observation.rs"
    (s,) = searches(medplum)
    assert s["status"] == 200 and s["auth_error"] is None
    assert set(s["claims"]) == SEARCH_CLAIMS and s["claims"]["aud"] == medplum.base
    assert s["claims"]["sub"] == s["claims"]["client_id"] == SERVICE == s["claims"]["iss"]
    assert s["claims"]["exp"] - s["claims"]["iat"] <= 60 and s["claims"]["scope"] == "system/Patient.rs"
    assert s["token_header"]["typ"] == "at+jwt"
    assert s["headers"]["accept"] == "application/fhir+json" and s["headers"]["prefer"] == "handling=strict"
    (row,) = json.loads(matching("link", "list", "--origin", "matched", "--json").output)
    assert row["target_patient"] == "t-1" and row["system"] == SSN and link_of(matching) == "matched"
    r = exchange(service, ehr, medplum.base, [{"system": SSN, "value": "123-45-6789"}])
    assert r.json()["patient"] == "t-1" and len(searches(medplum)) == 1  # the stored link: no search
    assert link_of(matching) == "matched-stored"


def test_no_patient_at_medplum_is_none_and_remembered(matching, medplum, service, ehr):
    seed(medplum, patient("t-1", (SSN, "1")))
    r = exchange(service, ehr, medplum.base, [f"{SSN}|2"], scope="patient/Observation.rs user/Observation.rs")
    assert r.status_code == 200 and "patient" not in r.json() and link_of(matching) == "none"
    r = exchange(service, ehr, medplum.base, [f"{SSN}|2"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    assert len(searches(medplum)) == 1 and link_of(matching) == "none"


@pytest.mark.parametrize("n", [2, 3])
def test_several_patients_with_one_identifier_at_medplum_are_ambiguous(matching, medplum, service, ehr, n):
    seed(medplum, *[patient(f"t-{i}", (SSN, "dup")) for i in range(n)])
    r = exchange(service, ehr, medplum.base, [f"{SSN}|dup"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    assert link_of(matching) == "ambiguous"
    assert json.loads(matching("link", "list", "--origin", "matched", "--json").output) == []


def test_two_identifiers_naming_different_patients_at_medplum_are_ambiguous(matching, medplum, service, ehr):
    seed(medplum, patient("t-1", (SSN, "1")), patient("t-2", (INS, "m")))
    r = exchange(service, ehr, medplum.base, [f"{SSN}|1", f"{INS}|m"])
    assert r.status_code == 400 and link_of(matching) == "ambiguous" and len(searches(medplum)) == 2


@pytest.mark.parametrize("extra", [{"active": False},
                                   {"link": [{"type": "replaced-by", "other": {"reference": "Patient/t-2"}}]}])
def test_an_inactive_or_replaced_patient_at_medplum_does_not_count(matching, medplum, service, ehr, extra):
    seed(medplum, patient("t-1", (SSN, "1"), **extra))
    r = exchange(service, ehr, medplum.base, [f"{SSN}|1"])
    assert r.status_code == 400 and link_of(matching) == "none"


@pytest.mark.parametrize("stored, asked", [("ABC-1", "abc-1"),  # Medplum ignores case
                                           ("a", "a|b")])  # and an escaped bar: it finds "a"
def test_medplum_s_loose_token_search_never_links_another_identifier(matching, medplum, service, ehr, stored, asked):
    seed(medplum, patient("t-1", (SSN, stored)))
    r = exchange(service, ehr, medplum.base, [{"system": SSN, "value": asked}])
    (s,) = searches(medplum)
    assert s["status"] == 200  # Medplum found t-1 ...
    assert r.status_code == 400 and link_of(matching) == "none"  # ... the service did not take it


@pytest.mark.parametrize("value", ["com,ma", "dol$lar", "back\\slash"])
def test_values_needing_escapes_find_exactly_their_patient_at_medplum(matching, medplum, service, ehr, value):
    seed(medplum, patient("t-1", (SSN, value)), patient("decoy", (SSN, "com")))
    r = exchange(service, ehr, medplum.base, [{"system": SSN, "value": value}])
    assert r.status_code == 200 and r.json()["patient"] == "t-1"


def test_a_search_token_medplum_refuses_is_503(matching, medplum, service, ehr):
    """Registered with a trailing slash, the target's aud is not Medplum's: 401 -> 503."""
    other = medplum.base + "/"
    matching("target", "add", other, "--match-identifier", SSN)
    matching("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", other,
             "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
    seed(medplum, patient("t-1", (SSN, "1")))
    r = exchange(service, ehr, other, [f"{SSN}|1"])
    assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable"
    assert r.headers["Retry-After"] == "30"
    (s,) = searches(medplum)
    assert s["status"] == 401 and '"aud"' in s["auth_error"]
    assert link_of(matching) == "unavailable"


def test_the_source_patient_is_read_at_a_medplum_ehr_with_a_backend_services_token(
        matching, medplum, service, ehr, fhir_server_factory):
    """End to end: the EHR's token endpoint checks the service's assertion against the
    service's /jwks over HTTP and issues a JWT; a second Medplum server, trusting the
    EHR, serves the source Patient; the target Medplum is searched with its identifiers."""
    ehr_fhir = fhir_server_factory(jwks_url=ehr.issuer + "/jwks", issuer=ehr.issuer)
    b = ehr.backend
    b.reset()
    try:
        b.client_id, b.audience = "te-at-ehr", ehr_fhir.base
        b.client_jwks = lambda: requests.get(service.url + "/jwks", timeout=10).json()
        matching("issuer", "update", ehr.issuer, "--source", SOURCE, "--source", ehr_fhir.base,
                 "--fhir-client-id", "te-at-ehr", "--token-endpoint", b.token_endpoint)
        ehr_fhir.seed(patient("a-7", (SSN, "777"), ("urn:example:mrn", "m-7")))
        seed(medplum, patient("t-7", (SSN, "777")))
        r = exchange(service, ehr, medplum.base, None, patient="a-7", source=ehr_fhir.base)
        assert r.status_code == 200, r.text
        assert r.json()["patient"] == "t-7"
        (read,) = ehr_fhir.requests()
        assert read["path"] == "/fhir/Patient/a-7" and read["status"] == 200
        assert read["claims"]["sub"] == "te-at-ehr" and read["claims"]["scope"] == "system/Patient.rs"
        assert len(b.token_requests) == 1 and b.token_requests[0]["header"]["alg"] in ("RS384", "ES384")
        assert [s["claims"]["aud"] for s in searches(medplum)] == [medplum.base]
    finally:
        b.reset()
