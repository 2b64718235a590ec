"""POST /token: the RFC 8693 access-token exchange, every numbered rule of the
contract and every row of its error table, through the real WSGI app with a fake
EHR serving its JWKS over loopback HTTP."""
from __future__ import annotations

import base64
import io
import json
import time

import jwt
import pytest

from conftest import AT, IDT, JWT_T, OTHER_SECRET, SERVICE, TE, VENDOR_SECRET, audit_rows, post_token
from fakes import SOURCE, TARGET, TARGET2, UPSTREAM, FakeEHR, new_key


def error_of(r, status, error):
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True))
    body = r.get_json()
    assert body["error"] == error, body
    assert body.get("error_description"), "every refusal says what to fix"
    assert "access_token" not in body
    assert r.headers["Cache-Control"] == "no-store"
    return body


def claims_of(http, token, audience=TARGET):
    """Verify as a target FHIR server would: nothing but the metadata's JWKS."""
    meta = http.get("/.well-known/oauth-authorization-server").get_json()
    jwks = http.get(meta["jwks_uri"].replace(SERVICE, "")).get_json()
    header = jwt.get_unverified_header(token)
    key = {k["kid"]: k for k in jwks["keys"]}[header["kid"]]
    return jwt.decode(token, jwt.PyJWK(key).key, algorithms=[header["alg"]], audience=audience,
                      issuer=meta["issuer"])


# -- the happy path -------------------------------------------------------------
def test_exchange_mints_rfc9068_token_verifiable_with_published_jwks(exchange, http, ehr):
    r = exchange()
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert r.headers["Cache-Control"] == "no-store"
    assert body["issued_token_type"] == AT and body["token_type"] == "Bearer"
    assert body["scope"] == "patient/Observation.rs" and body["patient"] == "b-456"
    assert "refresh_token" not in body
    header = jwt.get_unverified_header(body["access_token"])
    assert header["typ"] == "at+jwt" and header["alg"] == "RS256"
    c = claims_of(http, body["access_token"])
    assert c["iss"] == SERVICE and c["aud"] == TARGET and c["sub"] == "user-1"
    assert c["idp"] == ehr.issuer and c["client_id"] == "vendor" and c["act"] == {"sub": "vendor"}
    assert c["patient"] == "b-456" and c["scope"] == "patient/Observation.rs"
    assert c["fhirUser"] == SOURCE + "/Practitioner/p1"
    assert c["exp"] - c["iat"] == body["expires_in"] == 300
    assert c["jti"]


def test_requested_token_type_jwt_is_answered_as_jwt(exchange):
    r = exchange(requested_token_type=JWT_T)
    assert r.status_code == 200 and r.get_json()["issued_token_type"] == JWT_T


def test_subject_token_type_jwt_is_accepted_for_jwt_access_tokens(exchange):
    assert exchange(subject_token_type=JWT_T).status_code == 200


def test_audience_may_name_the_target_by_registered_name(exchange):
    r = exchange(resource=None, audience="hospital-b")
    assert r.status_code == 200
    assert r.get_json()["scope"] == "patient/Observation.rs"


def test_resource_and_audience_repeating_the_same_target_are_accepted(exchange):
    assert exchange(resource=[TARGET, TARGET], audience="hospital-b").status_code == 200


def test_client_secret_post_authenticates(http, ehr):
    data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
            "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET,
            "client_id": "vendor", "client_secret": VENDOR_SECRET}
    assert post_token(http, data, auth=None).status_code == 200


def test_absent_scope_grants_everything_allowed(exchange):
    r = exchange(scope=None)
    assert r.status_code == 200
    assert set(r.get_json()["scope"].split()) == {"patient/*.rs", "user/*.rs"}


# -- error table: invalid_client ---------------------------------------------------
def test_wrong_secret_is_invalid_client_401(exchange):
    r = exchange(auth=("vendor", "x" * 40))
    error_of(r, 401, "invalid_client")
    assert r.headers.get("WWW-Authenticate", "").startswith("Basic")


def test_unknown_client_is_invalid_client_401(exchange):
    error_of(exchange(auth=("nobody", VENDOR_SECRET)), 401, "invalid_client")


def test_missing_client_authentication_is_invalid_client_401(exchange):
    error_of(exchange(auth=None), 401, "invalid_client")


def test_failed_client_authentication_is_not_audited(exchange, world):
    exchange(auth=("vendor", "y" * 40))
    assert audit_rows(world) == []


def test_two_authentication_methods_is_invalid_request(exchange):
    error_of(exchange(client_id="vendor", client_secret=VENDOR_SECRET), 400, "invalid_request")


def test_client_id_parameter_must_match_basic_client(exchange):
    error_of(exchange(client_id="other"), 401, "invalid_client")


# -- error table: grant type and parameters ------------------------------------
def test_other_grant_type_is_unsupported_grant_type(exchange):
    error_of(exchange(grant_type="client_credentials"), 400, "unsupported_grant_type")


def test_missing_grant_type_is_invalid_request(exchange):
    error_of(exchange(grant_type=None), 400, "invalid_request")


@pytest.mark.parametrize("name", ["grant_type", "subject_token", "subject_token_type", "scope",
                                  "actor_token", "actor_token_type", "requested_token_type"])
def test_repeated_parameter_is_invalid_request(exchange, ehr, name):
    values = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
              "scope": "patient/Observation.rs", "actor_token": ehr.id_token(), "actor_token_type": IDT,
              "requested_token_type": AT}
    error_of(exchange(**{name: [values[name], values[name]]}), 400, "invalid_request")


@pytest.mark.parametrize("missing", ["subject_token", "subject_token_type"])
def test_missing_subject_parameter_is_invalid_request(exchange, missing):
    error_of(exchange(**{missing: None}), 400, "invalid_request")


@pytest.mark.parametrize("token_type", ["urn:ietf:params:oauth:token-type:refresh_token",
                                        "urn:ietf:params:oauth:token-type:saml2",
                                        "urn:ietf:params:oauth:token-type:saml1", "access_token"])
def test_unsupported_subject_token_type_is_invalid_request(exchange, token_type):
    error_of(exchange(subject_token_type=token_type), 400, "invalid_request")


def test_actor_token_without_type_is_invalid_request(exchange):
    error_of(exchange(actor_token_type=None), 400, "invalid_request")


def test_actor_token_type_without_token_is_invalid_request(exchange):
    error_of(exchange(actor_token=None), 400, "invalid_request")


def test_actor_token_type_other_than_id_token_is_invalid_request(exchange):
    error_of(exchange(actor_token_type=AT), 400, "invalid_request")


def test_unsupported_requested_token_type_is_invalid_request(exchange):
    error_of(exchange(requested_token_type="urn:ietf:params:oauth:token-type:refresh_token"),
             400, "invalid_request")


def test_malformed_scope_is_invalid_scope(exchange):
    error_of(exchange(scope="patient/Observation.xyz"), 400, "invalid_scope")


def test_json_body_is_invalid_request(http):
    r = http.post("/token", json={"grant_type": TE},
                  headers={"Authorization": "Basic " + base64.b64encode(f"vendor:{VENDOR_SECRET}".encode()).decode()})
    error_of(r, 400, "invalid_request")


def test_parameters_in_query_string_are_invalid_request(http, ehr):
    r = http.post("/token?scope=patient/*.rs", data={"grant_type": TE},
                  headers={"Authorization": "Basic " + base64.b64encode(f"vendor:{VENDOR_SECRET}".encode()).decode()})
    error_of(r, 400, "invalid_request")


def test_body_over_64_kib_is_413_invalid_request(exchange):
    r = exchange(subject_token="a" * (65 * 1024))
    error_of(r, 413, "invalid_request")


# -- error table: targets ------------------------------------------------------
def test_missing_target_is_invalid_request(exchange):
    error_of(exchange(resource=None), 400, "invalid_request")


def test_unknown_target_is_invalid_target(exchange):
    error_of(exchange(resource="https://unknown.example/fhir"), 400, "invalid_target")


@pytest.mark.parametrize("resource", ["fhir.b.example/fhir", "/fhir", TARGET + "#frag", "https://", "::"])
def test_malformed_resource_is_invalid_target(exchange, resource):
    error_of(exchange(resource=resource), 400, "invalid_target")


def test_target_matches_exactly_as_registered(exchange):
    error_of(exchange(resource=TARGET + "/"), 400, "invalid_target")


def test_several_targets_are_invalid_target(exchange):
    error_of(exchange(resource=[TARGET, TARGET2]), 400, "invalid_target")
    error_of(exchange(resource=TARGET, audience="clinic-c"), 400, "invalid_target")


def test_target_outside_the_clients_trust_is_invalid_target(exchange):
    error_of(exchange(resource=TARGET2), 400, "invalid_target")


def test_unknown_audience_name_is_invalid_target(exchange):
    error_of(exchange(resource=None, audience="nobody"), 400, "invalid_target")


# -- error table: unauthorized_client --------------------------------------------
def test_client_without_any_trust_is_unauthorized_client(exchange):
    error_of(exchange(auth=("other", OTHER_SECRET)), 400, "unauthorized_client")


# -- rule 1: tokens valid -------------------------------------------------------
def test_expired_subject_token_is_invalid_request(exchange, ehr):
    now = int(time.time())
    tok = ehr.sign(ehr.access_claims(iat=now - 1000, exp=now - 120))
    error_of(exchange(subject_token=tok), 400, "invalid_request")


def test_expired_actor_token_is_invalid_request(exchange, ehr):
    now = int(time.time())
    error_of(exchange(actor_token=ehr.sign(ehr.id_claims(iat=now - 1000, exp=now - 120))), 400, "invalid_request")


def test_token_without_exp_is_invalid_request(exchange, ehr):
    c = ehr.access_claims()
    del c["exp"]
    error_of(exchange(subject_token=ehr.sign(c)), 400, "invalid_request")


def test_token_not_yet_valid_is_invalid_request(exchange, ehr):
    now = int(time.time())
    error_of(exchange(subject_token=ehr.sign(ehr.access_claims(nbf=now + 600))), 400, "invalid_request")
    error_of(exchange(subject_token=ehr.sign(ehr.access_claims(iat=now + 600, exp=now + 1200))),
             400, "invalid_request")


def test_clock_skew_within_60_seconds_is_tolerated(exchange, ehr):
    now = int(time.time())
    assert exchange(subject_token=ehr.sign(ehr.access_claims(iat=now + 30, nbf=now + 30))).status_code == 200


def test_token_signed_by_a_foreign_key_is_invalid_request(exchange, ehr):
    tok = ehr.sign(ehr.access_claims(), key=new_key())
    error_of(exchange(subject_token=tok), 400, "invalid_request")


def test_unknown_kid_is_invalid_request(exchange, ehr):
    tok = ehr.sign(ehr.access_claims(), key=new_key(), headers={"kid": "forged"})
    error_of(exchange(subject_token=tok), 400, "invalid_request")


def test_alg_none_is_invalid_request(exchange, ehr):
    tok = jwt.encode(ehr.access_claims(), None, algorithm="none")
    error_of(exchange(subject_token=tok), 400, "invalid_request")


def test_hmac_with_the_public_key_is_invalid_request(exchange, ehr):
    head = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": ehr.kid}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(ehr.access_claims()).encode()).rstrip(b"=")
    tok = (head + b"." + body + b".c2ln").decode()
    error_of(exchange(subject_token=tok), 400, "invalid_request")


def test_algorithm_outside_issuer_allow_list_is_invalid_request(exchange, ehr):
    tok = ehr.sign(ehr.access_claims(), alg="RS512")
    error_of(exchange(subject_token=tok), 400, "invalid_request")


def test_tampered_payload_is_invalid_request(exchange, ehr):
    h, p, s = ehr.access_token().split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=="))
    claims["scope"] = "patient/*.cruds"
    p2 = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    error_of(exchange(subject_token=f"{h}.{p2}.{s}"), 400, "invalid_request")


@pytest.mark.parametrize("iss_suffix", ["/", "x", " "])
def test_issuer_spelled_differently_is_invalid_request(exchange, ehr, iss_suffix):
    tok = ehr.sign(ehr.access_claims(iss=ehr.issuer + iss_suffix))
    error_of(exchange(subject_token=tok), 400, "invalid_request")


def test_unregistered_issuer_is_invalid_request(exchange):
    stranger = FakeEHR("stranger")
    try:
        error_of(exchange(subject_token=stranger.access_token(), actor_token=stranger.id_token()),
                 400, "invalid_request")
    finally:
        stranger.stop()


def test_garbage_subject_token_is_invalid_request(exchange):
    error_of(exchange(subject_token="not.a.jwt"), 400, "invalid_request")


def test_access_token_for_another_audience_is_invalid_request(exchange, ehr):
    error_of(exchange(subject_token=ehr.access_token(aud="https://elsewhere.example/fhir")), 400, "invalid_request")


def test_id_token_presented_as_access_token_is_invalid_request(exchange, ehr):
    error_of(exchange(subject_token=ehr.id_token()), 400, "invalid_request")
    # even one that names a registered source as its audience
    error_of(exchange(subject_token=ehr.sign(ehr.id_claims(aud=SOURCE, nonce="n"))), 400, "invalid_request")


def test_access_token_presented_as_actor_id_token_is_invalid_request(exchange, ehr):
    error_of(exchange(actor_token=ehr.access_token()), 400, "invalid_request")


def test_registered_extra_audience_is_accepted(cli, env, ehr_b):
    from token_exchange import create_app
    cli("issuer", "add", ehr_b.issuer, "--jwks-uri", ehr_b.issuer + "/jwks", "--source", SOURCE + "-b",
        "--audience", "https://ehr-b.example/api", "--algs", "ES256")
    cli("target", "add", TARGET)
    cli("client", "add", "vendor", "--secret-env", "VENDOR_SECRET")
    cli("trust", "add", "--client", "vendor", "--issuer", ehr_b.issuer, "--target", TARGET,
        "--scopes", "user/*.rs", "--upstream-client-id", UPSTREAM)
    http = create_app(env=env).test_client()
    data = {"grant_type": TE, "subject_token": ehr_b.access_token(aud="https://ehr-b.example/api"),
            "subject_token_type": AT, "resource": TARGET, "scope": "user/Observation.rs"}
    r = post_token(http, data)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["scope"] == "user/Observation.rs"


# -- rule 2: one issuer, one subject, a registered source ---------------------------
def test_subject_and_actor_from_different_issuers_is_invalid_request(exchange, world, ehr_b, ehr):
    world("issuer", "add", ehr_b.issuer, "--jwks-uri", ehr_b.issuer + "/jwks", "--source", SOURCE,
          "--algs", "ES256")
    error_of(exchange(actor_token=ehr_b.id_token()), 400, "invalid_request")


def test_subject_and_actor_naming_different_subs_is_invalid_request(exchange, ehr):
    error_of(exchange(actor_token=ehr.id_token(sub="someone-else")), 400, "invalid_request")


def test_source_not_vouched_for_by_issuer_is_invalid_request(exchange, ehr):
    error_of(exchange(actor_token=ehr.id_token(source="https://fhir.evil.example/fhir")), 400, "invalid_request")


def test_id_token_and_access_token_naming_different_patients_is_invalid_request(exchange, ehr):
    error_of(exchange(subject_token=ehr.access_token(patient="a-999")), 400, "invalid_request")


# -- rule 3: issued to the trust's upstream client -----------------------------------
def test_access_token_issued_to_another_app_is_invalid_request(exchange, ehr):
    error_of(exchange(subject_token=ehr.access_token(client="another-app")), 400, "invalid_request")


def test_access_token_azp_is_accepted_as_upstream_client(exchange, ehr):
    tok = ehr.sign(ehr.access_claims(client_id=None, azp=UPSTREAM))
    assert exchange(subject_token=tok).status_code == 200


def test_id_token_issued_to_another_app_is_invalid_request(exchange, ehr):
    error_of(exchange(actor_token=ehr.id_token(client="another-app")), 400, "invalid_request")


def test_id_token_azp_must_equal_upstream_client(exchange, ehr):
    tok = ehr.sign(ehr.id_claims(aud=[UPSTREAM, "x"], azp="another-app"))
    error_of(exchange(actor_token=tok), 400, "invalid_request")


# -- rule 4: may_act ------------------------------------------------------------------
def test_may_act_naming_this_client_is_accepted(exchange, ehr):
    assert exchange(subject_token=ehr.access_token(may_act={"client_id": "vendor"})).status_code == 200
    assert exchange(subject_token=ehr.access_token(may_act={"sub": "vendor"})).status_code == 200


@pytest.mark.parametrize("may_act", [{"client_id": "someone-else"}, {"sub": "x"}, "vendor", {}])
def test_may_act_not_naming_this_client_is_invalid_request(exchange, ehr, may_act):
    error_of(exchange(subject_token=ehr.access_token(may_act=may_act)), 400, "invalid_request")


# -- rule 5: trust for issuer and target --------------------------------------------
def test_issuer_not_trusted_for_this_client_is_invalid_request(exchange, world, ehr_b):
    world("issuer", "add", ehr_b.issuer, "--jwks-uri", ehr_b.issuer + "/jwks", "--source", SOURCE,
          "--algs", "ES256")
    error_of(exchange(subject_token=ehr_b.access_token(), actor_token=ehr_b.id_token()), 400, "invalid_request")


def test_removed_trust_takes_effect_without_restart(exchange, world, ehr):
    assert exchange().status_code == 200
    world("trust", "remove", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET)
    error_of(exchange(), 400, "unauthorized_client")


# -- rule 6: scopes ---------------------------------------------------------------------
def test_scope_is_bounded_by_the_access_token(exchange, ehr):
    r = exchange(subject_token=ehr.access_token(scope="patient/Observation.rs"), scope="patient/*.rs")
    assert r.status_code == 200 and r.get_json()["scope"] == "patient/Observation.rs"


def test_scope_is_bounded_by_the_trust(exchange):
    r = exchange(scope="patient/Observation.cruds")
    assert r.status_code == 200 and r.get_json()["scope"] == "patient/Observation.rs"


def test_v1_request_is_answered_in_v1(exchange):
    r = exchange(scope="patient/Observation.read")
    assert r.status_code == 200 and r.get_json()["scope"] == "patient/Observation.read"


def test_param_scope_survives_against_plain_scope(exchange):
    r = exchange(scope="patient/Observation.rs?category=laboratory")
    assert r.get_json()["scope"] == "patient/Observation.rs?category=laboratory"


def test_write_beyond_every_bound_is_invalid_scope(exchange):
    error_of(exchange(scope="patient/Observation.c"), 400, "invalid_scope")


def test_contexts_never_cross(exchange):
    error_of(exchange(scope="system/Observation.rs"), 400, "invalid_scope")


def test_openid_and_launch_scopes_are_not_passed_on(exchange):
    error_of(exchange(scope="openid fhirUser launch/patient offline_access"), 400, "invalid_scope")
    r = exchange(scope="openid patient/Observation.rs")
    assert r.get_json()["scope"] == "patient/Observation.rs"


def test_access_token_without_scopes_grants_nothing(exchange, ehr):
    error_of(exchange(subject_token=ehr.access_token(scope=None)), 400, "invalid_scope")


# -- rule 7: patient mapping ----------------------------------------------------------
def test_unlinked_patient_loses_patient_scopes(exchange, ehr):
    r = exchange(actor_token=ehr.id_token(patient="a-unlinked"), scope="patient/Observation.rs user/Observation.rs")
    assert r.status_code == 200
    body = r.get_json()
    assert body["scope"] == "user/Observation.rs" and "patient" not in body


def test_unlinked_patient_with_only_patient_scopes_is_invalid_scope(exchange, ehr):
    error_of(exchange(actor_token=ehr.id_token(patient="a-unlinked")), 400, "invalid_scope")


def test_removed_link_takes_effect_without_restart(exchange, world):
    assert exchange().status_code == 200
    world("link", "remove", "--source", SOURCE, "--patient", "a-123", "--target", TARGET)
    error_of(exchange(), 400, "invalid_scope")


def test_patient_from_access_token_when_no_id_token(exchange, ehr):
    r = exchange(subject_token=ehr.access_token(patient="a-123"), actor_token=None, actor_token_type=None)
    assert r.status_code == 200 and r.get_json()["patient"] == "b-456"


def test_no_patient_means_no_patient_scopes(exchange, ehr):
    error_of(exchange(actor_token=None, actor_token_type=None), 400, "invalid_scope")


def test_patient_is_never_taken_from_request_parameters(exchange, ehr):
    r = exchange(actor_token=None, actor_token_type=None, patient="a-123")
    error_of(r, 400, "invalid_scope")


# -- lifetime ----------------------------------------------------------------------------
def test_lifetime_is_capped_by_what_remains_of_the_subject_token(exchange, ehr, http):
    r = exchange(subject_token=ehr.access_token(ttl=100))
    assert r.status_code == 200
    assert 95 <= r.get_json()["expires_in"] <= 100


def test_lifetime_is_capped_by_trust_and_target_max_ttl(world, ehr, env):
    from token_exchange import create_app
    world("target", "add", "https://fhir.d.example/fhir", "--max-ttl", "120")
    world("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", "https://fhir.d.example/fhir",
          "--scopes", "user/*.rs", "--upstream-client-id", UPSTREAM, "--max-ttl", "60")
    http = create_app(env=env).test_client()
    data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
            "resource": "https://fhir.d.example/fhir"}
    r = post_token(http, data)
    assert r.status_code == 200 and r.get_json()["expires_in"] == 60


# -- audit -------------------------------------------------------------------------------
def test_every_decision_is_audited_with_contract_fields(exchange, world, ehr):
    ok = exchange().get_json()
    exchange(scope="patient/Observation.c")
    rows = audit_rows(world)
    assert [r["outcome"] for r in rows] == ["granted", "refused"]
    g, f = rows
    assert set(g) >= {"time", "client_id", "issuer", "subject", "target", "source_patient", "target_patient",
                      "scope_requested", "scope_granted", "outcome", "error", "jti"}
    assert g["client_id"] == "vendor" and g["issuer"] == ehr.issuer and g["subject"] == "user-1"
    assert g["target"] == TARGET and g["source_patient"] == "a-123" and g["target_patient"] == "b-456"
    assert g["scope_granted"] == ok["scope"] and g["jti"] == jwt.decode(ok["access_token"], options={
        "verify_signature": False})["jti"]
    assert f["error"] == "invalid_scope" and f["scope_granted"] is None and f["jti"] is None
    assert audit_rows(world, "--outcome", "refused") == [f]


def test_audit_never_holds_tokens_or_secrets(exchange, world):
    tokens = [exchange().get_json()["access_token"]]
    dump = world("audit", "list", "--json").output + world("audit", "export", "--format", "fhir").output
    for t in tokens:
        assert t not in dump and t.split(".")[2] not in dump
    assert VENDOR_SECRET not in dump


# -- discovery and health -----------------------------------------------------------------
def test_metadata_advertises_the_contract_endpoints(http):
    from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
    meta = http.get("/.well-known/oauth-authorization-server").get_json()
    # RFC 8414 wants an https issuer; the tests serve http://te.test, so validate the https twin.
    # It has no authorization endpoint, so response_types_supported is honestly empty.
    twin = AuthorizationServerMetadata(json.loads(json.dumps(meta).replace("http://te.test", "https://te.test")))
    assert meta["response_types_supported"] == []
    for name in dir(twin):
        if name.startswith("validate_") and name != "validate_response_types_supported":
            getattr(twin, name)()
    assert meta["issuer"] == SERVICE and meta["token_endpoint"] == SERVICE + "/token"
    assert TE in meta["grant_types_supported"]
    assert {"client_secret_basic", "client_secret_post", "private_key_jwt"} <= set(
        meta["token_endpoint_auth_methods_supported"])
    assert {"RS384", "ES384"} <= set(meta["token_endpoint_auth_signing_alg_values_supported"])
    for k in ("jwks_uri", "introspection_endpoint", "revocation_endpoint"):
        assert meta[k].startswith(SERVICE)


def test_smart_configuration_advertises_token_exchange(http):
    smart = http.get("/.well-known/smart-configuration").get_json()
    assert "token-exchange-accesstoken" in smart["capabilities"]
    assert "token-exchange-openid" not in smart["capabilities"]  # no trust allows it
    assert smart["token_endpoint"] == SERVICE + "/token"


def test_jwks_publishes_public_keys_only_with_bounded_cache(http):
    r = http.get("/jwks")
    keys = r.get_json()["keys"]
    assert keys and all("d" not in k and k["kid"] for k in keys)
    max_age = int(r.headers["Cache-Control"].split("max-age=")[1])
    assert 0 < max_age <= 300


def test_health_and_readiness(http):
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200


def test_rate_limit_exceeded_is_429_temporarily_unavailable(world, env):
    from token_exchange import create_app
    http = create_app(env=dict(env, TOKEN_EXCHANGE_RATE_LIMIT="2")).test_client()
    data = {"grant_type": "client_credentials"}
    assert post_token(http, data).status_code == 400
    assert post_token(http, data).status_code == 400
    r = post_token(http, data)
    error_of(r, 429, "temporarily_unavailable")
    assert 1 <= int(r.headers["Retry-After"]) <= 60


def test_rate_limit_is_off_unless_configured(exchange):
    assert all(exchange(grant_type="x").status_code == 400 for _ in range(30))


def test_tokens_minted_here_are_not_accepted_as_subject_tokens(exchange):
    minted = exchange().get_json()["access_token"]
    error_of(exchange(subject_token=minted, actor_token=None, actor_token_type=None), 400, "invalid_request")


def test_metrics_count_exchanges_by_outcome_and_error(exchange, http):
    exchange()
    exchange(resource="https://unknown.example/fhir")
    from prometheus_client.parser import text_string_to_metric_families
    text = http.get("/metrics").get_data(as_text=True)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("token_exchange_requests_total", (("error", ""), ("outcome", "granted")))] == 1
    assert samples[("token_exchange_requests_total", (("error", "invalid_target"), ("outcome", "refused")))] == 1
    assert samples[("token_exchange_request_seconds_count", ())] == 2
    assert ("token_exchange_jwks_fetches_total", ()) in samples
    for name in ("token_exchange_requests", "token_exchange_request_seconds", "token_exchange_jwks_fetches"):
        assert f"# HELP {name}" in text and f"# TYPE {name}" in text


def test_logs_are_json_with_request_id_and_never_a_token_or_secret(exchange, ehr):
    import io
    import logging

    from token_exchange.logs import JSONFormatter
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    logging.getLogger("token_exchange").addHandler(handler)
    subject = ehr.access_token()
    r = exchange(subject_token=subject, auth=("vendor", "z" * 40), headers={"X-Request-Id": "req-42"})
    assert r.headers["X-Request-Id"] == "req-42"
    ok = exchange()
    assert len(ok.headers["X-Request-Id"]) == 32
    logging.getLogger("token_exchange").removeHandler(handler)
    err = stream.getvalue()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(rec.get("request_id") == "req-42" and rec["msg"] == "client authentication failed" for rec in lines)
    for secret in (subject, "z" * 40, VENDOR_SECRET, ok.get_json()["access_token"]):
        assert secret not in err


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_exp_is_invalid_request_never_500(exchange, ehr, literal):
    """Python's json reads NaN and Infinity; a signed token carrying them is refused."""
    import base64 as b64
    claims = json.dumps(ehr.access_claims(exp=0)).replace('"exp": 0', f'"exp": {literal}')
    header = json.dumps({"alg": "RS256", "kid": ehr.kid, "typ": "JWT"})
    seg = lambda b: b64.urlsafe_b64encode(b.encode()).rstrip(b"=").decode()  # noqa: E731
    signing_input = f"{seg(header)}.{seg(claims)}"
    sig = jwt.get_algorithm_by_name("RS256").sign(signing_input.encode(), ehr.key)
    token = signing_input + "." + b64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    error_of(exchange(subject_token=token), 400, "invalid_request")


@pytest.mark.parametrize("exp", ["NaN", "Infinity"])
def test_opaque_token_with_non_finite_exp_is_invalid_request(exchange, ehr, exp):
    ehr.opaque["opaque-nan"] = {"active": True, "sub": "user-1", "client_id": UPSTREAM, "scope": "patient/*.rs",
                                "exp": float(exp.lower() if exp == "NaN" else "inf")}
    error_of(exchange(subject_token="opaque-nan"), 400, "invalid_request")


@pytest.mark.parametrize("header", ["Basic //46/w==", "Basic é", "Basic \u0085", "Basic ", "Basic !!!", "Basic Og=="])
def test_malformed_basic_credentials_are_invalid_client_never_500(http, header):
    for path, data in (("/token", {"grant_type": TE}), ("/revoke", {"token": "x"}), ("/introspect", {"token": "x"})):
        r = http.post(path, data=data, headers={"Authorization": header.encode("utf-8").decode("latin-1")})
        error_of(r, 401, "invalid_client")


def test_chunked_body_over_64_kib_is_413_before_anything_else(http):
    body = b"grant_type=x&pad=" + b"a" * 70000
    r = http.post("/token", input_stream=io.BytesIO(body),
                  headers={"Transfer-Encoding": "chunked", "Content-Type": "text/plain"},
                  environ_overrides={"wsgi.input_terminated": True})  # as gunicorn sets for chunked
    error_of(r, 413, "invalid_request")


def test_chunked_form_body_is_parsed_like_any_other(http, ehr):
    from urllib.parse import urlencode
    body = urlencode({"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
                      "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET}).encode()
    auth = "Basic " + base64.b64encode(f"vendor:{VENDOR_SECRET}".encode()).decode()
    r = http.post("/token", input_stream=io.BytesIO(body),
                  headers={"Transfer-Encoding": "chunked", "Content-Type": "application/x-www-form-urlencoded",
                           "Authorization": auth}, environ_overrides={"wsgi.input_terminated": True})
    assert r.status_code == 200, r.get_json()


def test_unsigned_jwt_with_empty_signature_is_refused_locally(exchange, ehr):
    head = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps(ehr.access_claims()).encode()).rstrip(b"=").decode()
    ehr.introspection_auth.clear()
    error_of(exchange(subject_token=f"{head}.{body}."), 400, "invalid_request")
    assert ehr.introspection_auth == []  # never sent to the EHR as if opaque


def test_get_on_token_endpoint_is_json_no_store_and_names_the_allowed_methods(http):
    r = http.get("/token")
    assert r.status_code == 405 and r.headers["Cache-Control"] == "no-store"
    assert r.get_json()["error"] == "invalid_request"
    assert "POST" in r.headers["Allow"] and "POST" in r.get_json()["error_description"]
    r = http.post("/jwks")
    assert r.status_code == 405 and "GET" in r.headers["Allow"]


@pytest.mark.parametrize("body", [b"grant_type=\xff\xfe", b"grant_type=%FF%FE", b"scope=patient%2F\xe9"])
def test_form_body_that_is_not_utf8_is_invalid_request_naming_the_encoding(http, body):
    """Werkzeug's form parser reads such a body as an empty form; here it is refused for what it is."""
    auth = "Basic " + base64.b64encode(f"vendor:{VENDOR_SECRET}".encode()).decode()
    for chunked in (False, True):
        extra = ({"headers": {"Transfer-Encoding": "chunked", "Content-Type": "application/x-www-form-urlencoded",
                              "Authorization": auth}, "environ_overrides": {"wsgi.input_terminated": True}}
                 if chunked else {"headers": {"Content-Type": "application/x-www-form-urlencoded",
                                              "Authorization": auth}})
        r = http.post("/token", input_stream=io.BytesIO(body), **extra)
        err = error_of(r, 400, "invalid_request")
        assert "UTF-8" in err["error_description"]


def test_a_body_shorter_than_its_content_length_is_invalid_request_not_a_crash(http):
    body = b"grant_type=" + TE.encode()
    r = http.post("/token", input_stream=io.BytesIO(body), headers={"Content-Type": "application/x-www-form-urlencoded"},
                  environ_overrides={"CONTENT_LENGTH": str(len(body) + 500)})  # the client closed early
    error_of(r, 400, "invalid_request")


def test_post_token_has_one_entry_the_pipeline_in_front_of_flask(app, ehr):
    """POST /token is answered by endpoints.TokenEndpoint alone: Flask behind it knows the
    URL (for 405 and OPTIONS) but has no view to answer a POST with."""
    from urllib.parse import urlencode

    from werkzeug.test import EnvironBuilder
    assert "token_exchange.token" not in app.view_functions
    assert any(r.rule == "/token" for r in app.url_map.iter_rules())
    data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
            "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET,
            "scope": "patient/Observation.rs"}
    auth = "Basic " + base64.b64encode(f"vendor:{VENDOR_SECRET}".encode()).decode()
    environ = EnvironBuilder(path="/token", method="POST", data=urlencode(data),
                             content_type="application/x-www-form-urlencoded",
                             headers={"Authorization": auth, "X-Request-Id": "same-id"}).get_environ()
    seen = {}
    body = b"".join(app.wsgi_app(environ, lambda status, headers, exc=None: seen.update(status=status,
                                                                                       headers=dict(headers))))
    assert seen["status"] == "200 OK" and json.loads(body)["patient"] == "b-456"
    h = seen["headers"]
    assert h["Cache-Control"] == "no-store" and h["Content-Type"] == "application/json"
    assert h["X-Request-Id"] == "same-id"


def test_a_table_link_is_read_once_per_configuration_generation(app, world, exchange):
    """The warm path asks the database nothing a warm cache knows: a table link read under
    one configuration generation is answered from memory until an admin change moves it."""
    hot = app.extensions["token_exchange"].store._hot
    reads, run = [], hot.run

    def counted(statement, params, **kw):
        reads.append(statement is hot.find_link)
        return run(statement, params, **kw)
    hot.run = counted
    try:
        assert [exchange().get_json()["patient"] for _ in range(3)] == ["b-456"] * 3
        assert sum(reads) == 1
        world("link", "add", "--source", SOURCE, "--patient", "a-999", "--target", TARGET, "--target-patient", "b-9")
        assert exchange().get_json()["patient"] == "b-456"
        assert sum(reads) == 2
    finally:
        hot.run = run
