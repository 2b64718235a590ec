"""The Medplum FHIR test server (tests/fhir_server, tests/fhirserver.py) behaves as the
target FHIR server the service searches: Medplum's own token search, searchset Bundles,
and a resource server's bearer-JWT check against a JWKS fetched over HTTP. Also pins the
Medplum search quirks the service's matching must cope with (it re-checks every entry)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from urllib.parse import quote

import jwt
import pytest
import requests

from fakes import new_key
from fhirserver import HERE, JWKSServer, require_all, unavailable

if unavailable() and not require_all():  # one line in the summary; under REQUIRE_ALL the fixture fails
    pytest.skip(unavailable(), allow_module_level=True)

ISSUER = "http://te.test"  # the token-exchange service, minting its own search tokens
SYSTEM = "urn:oid:2.16.840.1.113883.4.1"
ALGS = ["RS256", "RS384", "PS256", "ES256", "ES384"]


class TokenIssuer:
    """The service's side: one key per algorithm, published at a loopback JWKS URL."""

    def __init__(self):
        self.keys = {alg: (f"k-{alg}", new_key(alg)) for alg in ALGS}
        self.jwks = JWKSServer({"keys": [self.public_jwk(alg, kid, key) for alg, (kid, key) in self.keys.items()]})

    @staticmethod
    def public_jwk(alg, kid, key):
        jwk = json.loads(jwt.get_algorithm_by_name(alg).to_jwk(key.public_key()))
        jwk.update(kid=kid, alg=alg, use="sig")
        return jwk

    def claims(self, aud, **over):
        now = int(time.time())
        c = {"iss": ISSUER, "aud": aud, "sub": ISSUER, "client_id": ISSUER, "scope": "system/Patient.rs",
             "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex}
        c.update(over)
        return {k: v for k, v in c.items() if v is not None}

    def token(self, aud, alg="RS256", key=None, headers=None, **over):
        kid, own = self.keys[alg]
        h = {"kid": kid, "typ": "at+jwt"}
        h.update(headers or {})
        return jwt.encode(self.claims(aud, **over), key or own, algorithm=alg, headers=h)

    def stop(self):
        self.jwks.stop()


@pytest.fixture(scope="module")
def issuer():
    i = TokenIssuer()
    yield i
    i.stop()


@pytest.fixture
def fhir(fhir_server_factory, issuer):
    return fhir_server_factory(jwks_url=issuer.jwks.url, issuer=ISSUER)


def fhir_escape(value):
    """FHIR search escaping (R4 3.1.1.5.7): a backslash before \\ | , $."""
    for c in "\\|,$":
        value = value.replace(c, "\\" + c)
    return value


def get(fhir, path, token=None, **headers):
    h = {"Accept": "application/fhir+json", "Prefer": "handling=strict"}
    if token:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers)
    return requests.get(path if path.startswith("http") else fhir.base + path, headers=h, timeout=30)


def search(fhir, token, value, system=SYSTEM, count=2):
    q = quote(f"{system}|{fhir_escape(value)}", safe="")
    return get(fhir, f"/Patient?identifier={q}&_count={count}", token)


def patient(pid, value, system=SYSTEM, **extra):
    return {"resourceType": "Patient", "id": pid, "identifier": [{"system": system, "value": value}], **extra}


def ids(bundle):
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def links(bundle):
    return {link["relation"]: link["url"] for link in bundle.get("link", [])}


# --- search -----------------------------------------------------------------------------

def test_search_by_identifier_finds_exactly_the_seeded_patient_as_a_match_entry(fhir, issuer):
    fhir.seed({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": patient("p1", "123-45-6789")},
        {"resource": patient("p2", "999-99-9999")},
        {"resource": patient("p3", "123-45-6789", system="urn:other")}]})
    r = search(fhir, issuer.token(fhir.base), "123-45-6789")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/fhir+json")
    b = r.json()
    assert b["resourceType"] == "Bundle" and b["type"] == "searchset"
    assert ids(b) == ["p1"] and b["total"] == 1
    assert b["entry"][0]["search"] == {"mode": "match"}
    assert b["entry"][0]["fullUrl"] == fhir.base + "/Patient/p1"
    assert b["entry"][0]["resource"]["identifier"] == [{"system": SYSTEM, "value": "123-45-6789"}]
    assert "next" not in links(b) and links(b)["self"].startswith(fhir.base + "/Patient?")


def test_search_finding_nothing_is_an_empty_searchset_without_entry(fhir, issuer):
    fhir.seed(patient("p1", "1"))
    b = search(fhir, issuer.token(fhir.base), "2").json()
    assert b["type"] == "searchset" and b["total"] == 0 and "entry" not in b and "next" not in links(b)


def test_two_patients_with_one_identifier_both_come_back_with_total_2(fhir, issuer):
    fhir.seed({"resourceType": "Bundle", "entry": [{"resource": patient("p1", "dup")},
                                                   {"resource": patient("p2", "dup")}]})
    b = search(fhir, issuer.token(fhir.base), "dup").json()
    assert sorted(ids(b)) == ["p1", "p2"] and b["total"] == 2
    assert [e["search"]["mode"] for e in b["entry"]] == ["match", "match"]
    assert "next" not in links(b)  # both fit in _count=2


def test_more_matches_than_count_give_a_next_link_and_the_full_total(fhir, issuer):
    fhir.seed({"resourceType": "Bundle", "entry": [{"resource": patient(f"p{i}", "dup")} for i in range(3)]})
    token = issuer.token(fhir.base)
    first = search(fhir, token, "dup").json()
    assert len(first["entry"]) == 2 and first["total"] == 3
    nxt = links(first)["next"]
    assert nxt.startswith(fhir.base + "/Patient?") and "_offset=2" in nxt and "_count=2" in nxt
    second = get(fhir, nxt, token).json()
    assert len(second["entry"]) == 1 and "next" not in links(second) and "previous" in links(second)
    assert sorted(ids(first) + ids(second)) == ["p0", "p1", "p2"]


@pytest.mark.parametrize("value", ["back\\slash", "com,ma", "dol$lar", "all\\,$of them"])
def test_a_value_needing_fhir_escaping_is_found_once_escaped_and_percent_encoded(fhir, issuer, value):
    fhir.seed({"resourceType": "Bundle", "entry": [{"resource": patient("p1", value)},
                                                   {"resource": patient("decoy", "com")}]})
    b = search(fhir, issuer.token(fhir.base), value).json()
    assert ids(b) == ["p1"] and b["total"] == 1


def test_medplum_quirk_an_escaped_bar_in_the_value_matches_the_text_before_it(fhir, issuer):
    """Medplum unescapes the value, then splits system|value at every `|`: "a\\|b" never
    finds "a|b" and finds "a" instead. The service must check system and value itself."""
    fhir.seed({"resourceType": "Bundle", "entry": [{"resource": patient("bar", "a|b")},
                                                   {"resource": patient("a", "a")}]})
    assert ids(search(fhir, issuer.token(fhir.base), "a|b").json()) == ["a"]


def test_medplum_quirk_token_search_ignores_case(fhir, issuer):
    fhir.seed(patient("upper", "ABC-1"))
    b = search(fhir, issuer.token(fhir.base), "abc-1", system=SYSTEM.upper()).json()
    assert ids(b) == ["upper"]  # the service must compare system and value exactly itself


def test_medplum_quirk_an_unescaped_comma_searches_either_value(fhir, issuer):
    fhir.seed({"resourceType": "Bundle", "entry": [{"resource": patient("a", "a")}, {"resource": patient("b", "b")}]})
    q = quote(f"{SYSTEM}|a,b", safe="")
    assert sorted(ids(get(fhir, f"/Patient?identifier={q}&_count=2", issuer.token(fhir.base)).json())) == ["a", "b"]


def test_medplum_quirk_an_unknown_search_parameter_matches_nothing_even_when_strict(fhir, issuer):
    fhir.seed(patient("p1", "1"))
    r = get(fhir, "/Patient?no-such-param=1", issuer.token(fhir.base))
    assert r.status_code == 200 and r.json()["total"] == 0


def test_inactive_and_replaced_patients_are_returned_for_the_service_to_filter(fhir, issuer):
    fhir.seed({"resourceType": "Bundle", "entry": [
        {"resource": patient("off", "77", active=False)},
        {"resource": patient("old", "78", link=[{"type": "replaced-by", "other": {"reference": "Patient/new"}}])}]})
    token = issuer.token(fhir.base)
    off = search(fhir, token, "77").json()
    assert ids(off) == ["off"] and off["entry"][0]["resource"]["active"] is False
    assert ids(search(fhir, token, "78").json()) == ["old"]


def test_read_by_id_and_unknown_id(fhir, issuer):
    fhir.seed(patient("p1", "1"))
    token = issuer.token(fhir.base)
    r = get(fhir, "/Patient/p1", token)
    assert r.status_code == 200 and r.json()["id"] == "p1" and r.json()["resourceType"] == "Patient"
    r = get(fhir, "/Patient/nope", token)
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"


def test_create_needs_a_create_scope_and_answers_201_with_location(fhir, issuer):
    body = patient(None, "new-1")
    del body["id"]
    h = {"Content-Type": "application/fhir+json"}
    r = requests.post(fhir.base + "/Patient", json=body, timeout=30,
                      headers={**h, "Authorization": "Bearer " + issuer.token(fhir.base, scope="system/Patient.cruds")})
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == f"{fhir.base}/Patient/{r.json()['id']}"
    assert ids(search(fhir, issuer.token(fhir.base), "new-1").json()) == [r.json()["id"]]
    r = requests.post(fhir.base + "/Patient", json=body, timeout=30,
                      headers={**h, "Authorization": "Bearer " + issuer.token(fhir.base)})
    assert r.status_code == 403


def test_invalid_resources_are_refused_by_medplum_validation(fhir):
    with pytest.raises(AssertionError, match="400.*expected boolean"):
        fhir.seed({"resourceType": "Patient", "active": "yes"})
    with pytest.raises(AssertionError, match="400"):  # a Bundle is validated before any entry is stored
        fhir.seed({"resourceType": "Bundle", "entry": [{"resource": patient("ok", "1")},
                                                       {"resource": {"resourceType": "Patient", "gender": 3}}]})
    fhir.seed(patient("later", "2"))
    assert fhir.requests() == []


def test_reset_forgets_resources_and_recorded_requests(fhir, issuer):
    fhir.seed(patient("p1", "1"))
    search(fhir, issuer.token(fhir.base), "1")
    fhir.reset()
    assert fhir.requests() == []
    assert search(fhir, issuer.token(fhir.base), "1").json()["total"] == 0


# --- bearer tokens ------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ALGS)
def test_tokens_signed_with_each_supported_algorithm_verify(fhir, issuer, alg):
    fhir.seed(patient("p1", "1"))
    r = search(fhir, issuer.token(fhir.base, alg=alg), "1")
    assert r.status_code == 200 and ids(r.json()) == ["p1"]
    assert fhir.requests()[-1]["token_header"] == {"alg": alg, "kid": f"k-{alg}", "typ": "at+jwt"}


BAD_TOKENS = {
    "wrong_aud": (lambda i, f: i.token("http://127.0.0.1:1/fhir"), '"aud"'),
    "aud_of_another_path": (lambda i, f: i.token(f.base + "/"), '"aud"'),
    "wrong_iss": (lambda i, f: i.token(f.base, iss="http://evil.test"), '"iss"'),
    "expired": (lambda i, f: i.token(f.base, iat=int(time.time()) - 300, exp=int(time.time()) - 120), '"exp"'),
    "iat_in_the_future": (lambda i, f: i.token(f.base, iat=int(time.time()) + 600, exp=int(time.time()) + 660),
                          '"iat"'),
    "no_exp": (lambda i, f: i.token(f.base, exp=None), '"exp"'),
    "no_iat": (lambda i, f: i.token(f.base, iat=None), '"iat"'),
    "bad_signature": (lambda i, f: i.token(f.base, key=new_key("RS256")), "signature verification failed"),
    "unknown_kid": (lambda i, f: i.token(f.base, headers={"kid": "nobody"}), "no applicable key"),
    "typ_jwt": (lambda i, f: i.token(f.base, headers={"typ": "JWT"}), '"typ"'),
    "alg_none": (lambda i, f: jwt.encode(i.claims(f.base), None, algorithm="none", headers={"typ": "at+jwt"}),
                 "alg"),
    "garbage": (lambda i, f: "not.a.jwt", "ERR_JWS_INVALID"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_an_invalid_bearer_token_is_401_invalid_token(fhir, issuer, case):
    make, reason = BAD_TOKENS[case]
    fhir.seed(patient("p1", "1"))
    r = search(fhir, make(issuer, fhir), "1")
    assert r.status_code == 401, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert r.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    rec = fhir.requests()[-1]
    assert rec["status"] == 401 and rec["claims"] is None and reason in rec["auth_error"], rec


@pytest.mark.parametrize("authorization", [None, "Basic dTpw", "Bearer", "Bearer a b"])
def test_no_usable_bearer_token_is_401(fhir, issuer, authorization):
    h = {"Authorization": authorization} if authorization else {}
    r = get(fhir, "/Patient?identifier=x", **h)
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
    assert fhir.requests()[-1]["auth_error"] in ("no bearer token", "malformed Authorization header")


@pytest.mark.parametrize("scope", ["system/Patient.rs", "system/Patient.read", "system/*.rs", "system/*.read",
                                   "system/Patient.s", "system/Patient.cruds", "system/*.*",
                                   "openid system/Patient.rs"])
def test_scopes_that_allow_patient_search(fhir, issuer, scope):
    fhir.seed(patient("p1", "1"))
    assert search(fhir, issuer.token(fhir.base, scope=scope), "1").status_code == 200


@pytest.mark.parametrize("scope", [None, "", "system/Observation.rs", "patient/Patient.rs", "user/Patient.rs",
                                   "system/Patient.r", "system/Patient.write", "system/Patient.rs?identifier=x",
                                   "system/Patient.sr", "System/Patient.rs"])
def test_a_token_without_a_patient_search_scope_is_403_insufficient_scope(fhir, issuer, scope):
    r = search(fhir, issuer.token(fhir.base, scope=scope), "1")
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert r.headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope"'
    rec = fhir.requests()[-1]
    assert rec["claims"]["jti"] and "does not allow s on Patient" in rec["auth_error"]


def test_read_needs_r_and_search_needs_s(fhir, issuer):
    fhir.seed(patient("p1", "1"))
    assert get(fhir, "/Patient/p1", issuer.token(fhir.base, scope="system/Patient.s")).status_code == 403
    assert get(fhir, "/Patient/p1", issuer.token(fhir.base, scope="system/Patient.r")).status_code == 200


def test_the_jwks_is_fetched_over_http_once_and_cached(fhir_server_factory):
    own = TokenIssuer()
    try:
        server = fhir_server_factory(jwks_url=own.jwks.url, issuer=ISSUER)
        assert own.jwks.hits == 0  # fetched lazily, on the first token
        for _ in range(3):
            assert search(server, own.token(server.base), "1").status_code == 200
        assert own.jwks.hits == 1
    finally:
        own.stop()


def test_a_configured_audience_replaces_the_base_url(fhir_server_factory, issuer):
    server = fhir_server_factory(jwks_url=issuer.jwks.url, issuer=ISSUER, audience="https://fhir.b.example/fhir")
    assert search(server, issuer.token("https://fhir.b.example/fhir"), "1").status_code == 200
    assert search(server, issuer.token(server.base), "1").status_code == 401


# --- recording and admin ---------------------------------------------------------------

def test_every_request_is_recorded_with_its_verified_claims(fhir, issuer):
    token = issuer.token(fhir.base, alg="ES256")
    search(fhir, token, "a,b")
    get(fhir, "/Patient/x")
    get(fhir, f"http://127.0.0.1:{fhir.port}/elsewhere", token)
    rec = fhir.requests()
    assert [(r["method"], r["path"], r["status"]) for r in rec] == [
        ("GET", f"/fhir/Patient?identifier={quote(SYSTEM + '|a' + chr(92) + ',b', safe='')}&_count=2", 200),
        ("GET", "/fhir/Patient/x", 401),
        ("GET", "/elsewhere", 404)]
    assert rec[0]["headers"]["accept"] == "application/fhir+json"
    assert rec[0]["headers"]["prefer"] == "handling=strict"
    assert rec[0]["authorization_scheme"] == "Bearer" and rec[0]["auth_error"] is None
    assert rec[0]["claims"] == jwt.decode(token, options={"verify_signature": False})
    assert rec[0]["token_header"] == {"alg": "ES256", "kid": "k-ES256", "typ": "at+jwt"}
    assert rec[1]["claims"] is None and rec[1]["auth_error"] == "no bearer token"
    assert "token" not in json.dumps(rec[0]["headers"]).lower()  # the bearer token itself is not kept


def test_admin_endpoints_need_the_admin_token_and_are_not_under_the_fhir_base(fhir, issuer):
    admin = fhir.admin + "/requests"
    assert requests.get(admin, timeout=30).status_code == 401
    assert requests.get(admin, headers={"X-Admin-Token": fhir.admin_token + "x"}, timeout=30).status_code == 401
    assert requests.post(fhir.admin + "/reset", headers={"X-Admin-Token": "x" * len(fhir.admin_token)},
                         timeout=30).status_code == 401
    assert not fhir.admin.startswith(fhir.base)
    r = get(fhir, "/admin/requests", issuer.token(fhir.base, scope="system/*.rs"))
    assert r.status_code == 404  # a FHIR read of type "admin": nothing there
    assert [r["path"] for r in fhir.requests()] == ["/fhir/admin/requests"]  # admin calls are not recorded


def test_listens_on_loopback_only(fhir):
    assert fhir.base.startswith(f"http://127.0.0.1:{fhir.port}/")


def test_start_up_refuses_missing_configuration(fhir_server_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_SERVER_")}
    r = subprocess.run([shutil.which("node"), str(HERE / "server.js")], cwd=HERE, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert "FHIR_SERVER_JWKS_URL" in r.stderr and "FHIR_SERVER_ISSUER" in r.stderr and "ADMIN_TOKEN" in r.stderr
