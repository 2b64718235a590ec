"""POST /token with the JWT authorization grant (contract "JWT authorization grant
(identity and authorization chaining)"): the EHR's access token stays home; the
EHR mints a short grant addressed to this service, the client presents it with
grant_type jwt-bearer, and the same trusts, links, scopes, minting and audit apply."""
from __future__ import annotations

import time
import uuid

import jwt
import pytest

from conftest import AT, IDT, SERVICE, TE, VENDOR_SECRET, audit_rows, post_token
from fakes import SOURCE, TARGET, TARGET2, UPSTREAM
from test_token import claims_of, error_of

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def grant_claims(ehr, **over):
    now = int(time.time())
    c = {"iss": ehr.issuer, "sub": "user-1", "aud": SERVICE, "client_id": "vendor", "azp": UPSTREAM,
         "iat": now, "exp": now + 120, "jti": uuid.uuid4().hex, "scope": "patient/*.rs",
         "patient": "a-123", "source": SOURCE, "fhirUser": SOURCE + "/Practitioner/p1"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def make_grant(ehr, headers=None, **over):
    h = {"typ": "oauth-id-jag+jwt"}
    h.update(headers or {})
    return ehr.sign(grant_claims(ehr, **over), headers={k: v for k, v in h.items() if v is not None})


@pytest.fixture
def allowed(world, ehr):
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--allow-jwt-grant")
    return world


@pytest.fixture
def present(http, ehr, allowed):
    def do(assertion=None, auth=("vendor", VENDOR_SECRET), **over):
        data = {"grant_type": JWT_BEARER, "assertion": assertion or make_grant(ehr), "resource": TARGET,
                "scope": "patient/Observation.rs"}
        data.update(over)
        return post_token(http, {k: v for k, v in data.items() if v is not None}, auth=auth)
    return do


def test_jwt_grant_mints_a_token_for_the_target_with_the_grant_s_subject(present, http, ehr, allowed):
    assertion = make_grant(ehr)
    r = present(assertion)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert "issued_token_type" not in body and body["token_type"] == "Bearer"
    assert body["scope"] == "patient/Observation.rs" and body["patient"] == "b-456"
    c = claims_of(http, body["access_token"])
    assert c["sub"] == "user-1" and c["idp"] == ehr.issuer and c["fhirUser"] == SOURCE + "/Practitioner/p1"
    assert c["client_id"] == "vendor" and c["act"] == {"sub": "vendor"} and c["patient"] == "b-456"
    assert c["exp"] - c["iat"] == 300  # the assertion's 2-minute exp caps nothing
    (row,) = audit_rows(allowed)
    assert row["grant"] == "jwt-bearer" and row["assertion_jti"] == jwt.decode(
        assertion, options={"verify_signature": False})["jti"]
    assert row["outcome"] == "granted" and row["link"] == "table"


def test_replayed_assertion_is_invalid_grant(present, ehr):
    assertion = make_grant(ehr)
    assert present(assertion).status_code == 200
    error_of(present(assertion), 400, "invalid_grant")


def test_a_refused_request_leaves_the_jti_unspent(present, ehr):
    assertion = make_grant(ehr)
    error_of(present(assertion, resource=TARGET2), 400, "invalid_target")
    error_of(present(assertion, scope="patient/Observation.c"), 400, "invalid_scope")
    assert present(assertion).status_code == 200


@pytest.mark.parametrize("over, headers", [
    ({"aud": "https://elsewhere.example"}, None),
    ({"aud": [SERVICE, "https://elsewhere.example"]}, None),
    ({"aud": None}, None),
    ({"exp": lambda now: now + 600}, None),  # lives 10 minutes
    ({"jti": None}, None), ({"sub": None}, None), ({"iat": None}, None), ({"client_id": None}, None),
    ({"client_id": "other"}, None),
    ({"nonce": "n-1"}, None), ({"at_hash": "abc"}, None),
    ({"iat": lambda now: now + 200, "exp": lambda now: now + 300}, None),
    ({"iat": lambda now: now - 400, "exp": lambda now: now - 100}, None),  # expired
    ({"iss": "https://ehr.unknown.example"}, None),
    ({}, {"typ": None}), ({}, {"typ": "JWT"}), ({}, {"typ": "at+jwt"}),
])
def test_a_bad_assertion_is_invalid_grant(present, ehr, over, headers):
    now = int(time.time())  # times relative to the run, not to collection (a long suite outlives them)
    over = {k: v(now) if callable(v) else v for k, v in over.items()}
    error_of(present(make_grant(ehr, headers=headers, **over)), 400, "invalid_grant")


def test_an_array_of_one_audience_naming_the_token_endpoint_is_accepted(present, ehr):
    assert present(make_grant(ehr, aud=[SERVICE + "/token"])).status_code == 200


def test_an_assertion_signed_by_another_key_or_not_a_jwt_is_invalid_grant(present, ehr):
    from fakes import new_key
    forged = ehr.sign(grant_claims(ehr), key=new_key(), headers={"typ": "oauth-id-jag+jwt"})
    error_of(present(forged), 400, "invalid_grant")
    error_of(present("not-a-jwt"), 400, "invalid_grant")


def test_a_trust_without_allow_jwt_grant_is_unauthorized_client(present, world, ehr):
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET,
          "--no-allow-jwt-grant")
    error_of(present(), 400, "unauthorized_client")


def test_an_issuer_not_trusted_for_this_client_is_invalid_request(present, world, ehr_b):
    world("issuer", "add", ehr_b.issuer, "--jwks-uri", ehr_b.issuer + "/jwks", "--source", "https://fhir.x.example")
    error_of(present(make_grant(ehr_b, source=None, patient=None)), 400, "invalid_request")


def test_azp_of_another_upstream_client_is_invalid_request(present, ehr):
    error_of(present(make_grant(ehr, azp="another-app")), 400, "invalid_request")


def test_scopes_wider_than_the_assertion_s_are_cut_to_it(present, ehr):
    r = present(make_grant(ehr, scope="patient/Observation.r"), scope="patient/Observation.rs patient/Condition.rs")
    assert r.status_code == 200 and r.get_json()["scope"] == "patient/Observation.r"
    r = present(make_grant(ehr, scope="patient/Condition.rs"), scope="patient/Observation.rs")
    error_of(r, 400, "invalid_scope")


def test_without_a_scope_claim_the_trust_bounds_the_grant(present, ehr):
    r = present(make_grant(ehr, scope=None), scope=None)
    assert r.status_code == 200 and r.get_json()["scope"] == "patient/*.rs user/*.rs"


def test_without_a_patient_link_patient_scopes_are_not_granted(present, ehr):
    r = present(make_grant(ehr, patient="a-999", scope="patient/*.rs user/*.rs"),
                scope="patient/Observation.rs user/Observation.rs")
    assert r.status_code == 200 and r.get_json()["scope"] == "user/Observation.rs" and "patient" not in r.get_json()


@pytest.mark.parametrize("extra", [{"subject_token": "x"}, {"subject_token_type": "x"}, {"actor_token": "x"},
                                   {"requested_token_type": "urn:ietf:params:oauth:token-type:access_token"}])
def test_token_exchange_parameters_are_refused_in_the_jwt_grant(present, ehr, extra):
    error_of(present(**extra), 400, "invalid_request")


def test_assertion_twice_or_missing_is_invalid_request(http, ehr, allowed):
    a = make_grant(ehr)
    error_of(post_token(http, [("grant_type", JWT_BEARER), ("assertion", a), ("assertion", a),
                               ("resource", TARGET)]), 400, "invalid_request")
    error_of(post_token(http, {"grant_type": JWT_BEARER, "resource": TARGET}), 400, "invalid_request")


def test_client_authentication_comes_first(present, ehr):
    error_of(present(auth=("vendor", "wrong-" + "x" * 40)), 401, "invalid_client")


def test_discovery_advertises_the_jwt_grant_only_while_a_trust_allows_it(http, world, ehr):
    def grants(path):
        return http.get(path).get_json()["grant_types_supported"]
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/smart-configuration"):
        assert JWT_BEARER not in grants(path)
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--allow-jwt-grant")
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/smart-configuration"):
        assert grants(path) == ["urn:ietf:params:oauth:grant-type:token-exchange", JWT_BEARER]


def test_a_real_client_performs_the_grant_with_authlib_and_joserfc(allowed, ehr, http):
    """Authlib's OAuth2Session as the vendor backend, presenting a grant that joserfc signed
    with the EHR's key; the app's HTTP surface is reached through a requests adapter."""
    from authlib.integrations.requests_client import OAuth2Session
    from cryptography.hazmat.primitives import serialization
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import RSAKey
    pem = ehr.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    assertion = jose_jwt.encode({"alg": "RS256", "kid": ehr.kid, "typ": "oauth-id-jag+jwt"}, grant_claims(ehr),
                                RSAKey.import_key(pem))
    session = OAuth2Session("vendor", VENDOR_SECRET, token_endpoint_auth_method="client_secret_basic")
    session.mount(SERVICE, _FlaskAdapter(http))
    token = session.fetch_token(SERVICE + "/token", grant_type=JWT_BEARER, assertion=assertion, resource=TARGET,
                                scope="patient/Observation.rs")
    assert token["token_type"] == "Bearer" and token["patient"] == "b-456"
    assert claims_of(http, token["access_token"])["sub"] == "user-1"


class _FlaskAdapter:
    """A requests transport adapter that hands the request to a Flask test client."""

    def __init__(self, client):
        self.client = client

    def send(self, request, **kw):
        import requests
        from urllib.parse import urlsplit
        path = urlsplit(request.url).path
        r = self.client.open(path, method=request.method, data=request.body, headers=dict(request.headers))
        resp = requests.Response()
        resp.status_code, resp._content = r.status_code, r.get_data()
        resp.headers.update(r.headers)
        resp.url, resp.request = request.url, request
        return resp

    def close(self):
        pass


def test_a_grant_spent_at_one_instance_is_refused_at_another(present, ehr, env, allowed):
    """Two instances on one database (with Redis too when configured): the jti is shared."""
    from token_exchange import create_app
    other = create_app(env=env)
    try:
        assertion = make_grant(ehr)
        assert present(assertion).status_code == 200
        r = post_token(other.test_client(), {"grant_type": JWT_BEARER, "assertion": assertion, "resource": TARGET})
        error_of(r, 400, "invalid_grant")
    finally:
        other.extensions["token_exchange"].store.close()
        other.extensions["token_exchange"].engine.dispose()


def test_explain_runs_the_jwt_grant_without_spending_its_jti(allowed, ehr, tmp_path, present):
    import json as _json
    assertion = make_grant(ehr)
    (tmp_path / "grant.jwt").write_text(assertion)
    for _ in range(2):
        r = allowed("explain", "--client", "vendor", "--assertion", str(tmp_path / "grant.jwt"), "--resource",
                    TARGET, "--scope", "patient/Observation.rs", "--json", check=False)
        assert r.exit_code == 0, r.output
        report = _json.loads(r.stdout)
        assert report["decision"]["patient"] == "b-456"
        assert "assertion (invalid_grant)" in [s["step"] for s in report["steps"]]
    assert present(assertion).status_code == 200  # explain spent nothing


@pytest.mark.parametrize("claim", [["patient/Observation.rs"], 5, {"patient/Observation.rs": True}, True,
                                   ["patient/Observation.rs", 7]])
def test_a_malformed_scope_claim_in_the_grant_is_invalid_grant_never_read_as_absent(present, ehr, claim):
    """Rule 6: never wider than any side. A present scope claim that is not a string was
    read as no claim, so patient/*.rs came back for a grant allowing patient/Observation.rs."""
    r = present(make_grant(ehr, scope=claim), scope="patient/*.rs")
    body = error_of(r, 400, "invalid_grant")
    assert "scope" in body["error_description"]


@pytest.mark.parametrize("claim", [5, {"patient/Observation.rs": True}, ["patient/Observation.rs", 7]])
def test_a_malformed_scope_claim_in_the_subject_token_is_invalid_request_naming_it(http, ehr, claim):
    """The exchange reads its subject token's scope claim through the same function as the
    grant: a string, or an array of strings; anything else is named, not read as empty."""
    data = {"grant_type": TE, "subject_token": ehr.access_token(scope=claim), "subject_token_type": AT,
            "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET}
    body = error_of(post_token(http, data), 400, "invalid_request")
    assert "scope claim" in body["error_description"]
