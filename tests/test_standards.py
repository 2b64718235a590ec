"""Standards details (contract "Standards details" and the JWT grant's "other
direction"): patient claims normalised to (source, id) before any comparison;
tokens addressed to this service refused as subject or actor tokens; SMART
discovery's lists; fhirUser at /introspect; signing keys of every supported
algorithm verified by a target with nothing but the JWKS."""
from __future__ import annotations

import base64

import jwt
import pytest

from conftest import SERVICE, TARGET_SECRET
from fakes import SOURCE, TARGET
from test_token import claims_of, error_of

SOURCE2 = "https://fhir.a2.example/fhir"


@pytest.mark.parametrize("patient", ["a-123", "Patient/a-123", SOURCE + "/Patient/a-123"])
def test_patient_claims_in_every_accepted_form_map_to_the_same_link(exchange, ehr, patient):
    r = exchange(actor_token=ehr.id_token(patient=patient, source=None))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["patient"] == "b-456"


def test_an_absolute_reference_places_the_patient_when_the_issuer_has_several_sources(world, exchange, ehr):
    world("issuer", "update", ehr.issuer, "--source", SOURCE, "--source", SOURCE2)
    r = exchange(actor_token=ehr.id_token(patient=SOURCE + "/Patient/a-123", source=None))
    assert r.status_code == 200 and r.get_json()["patient"] == "b-456"
    # a bare id without a source claim is unknown when there are several sources: no patient scopes
    error_of(exchange(actor_token=ehr.id_token(patient="a-123", source=None)), 400, "invalid_scope")


@pytest.mark.parametrize("patient, source", [
    ("https://fhir.elsewhere.example/fhir/Patient/a-123", None),  # another base
    (SOURCE + "/Patient/a-123/_history/2", None),
    ("Patient/a-123?x=1", None),
    ("Patient/a-123#frag", None),
    ("Patient/a-123/_history/2", None),
    (SOURCE + "/Observation/o-1", None),
    (SOURCE + "/Patient/a-123", SOURCE2),  # a source claim that disagrees
])
def test_malformed_or_foreign_patient_references_are_invalid_request(world, exchange, ehr, patient, source):
    world("issuer", "update", ehr.issuer, "--source", SOURCE, "--source", SOURCE2)
    error_of(exchange(actor_token=ehr.id_token(patient=patient, source=source)), 400, "invalid_request")


def test_both_tokens_carrying_a_source_must_agree_also_through_absolute_references(world, exchange, ehr):
    world("issuer", "update", ehr.issuer, "--source", SOURCE, "--source", SOURCE2)
    at = ehr.access_token(patient=SOURCE2 + "/Patient/a-123")
    error_of(exchange(subject_token=at, actor_token=ehr.id_token(patient="a-123", source=SOURCE)), 400,
             "invalid_request")
    at = ehr.access_token(patient=SOURCE + "/Patient/a-123")
    assert exchange(subject_token=at, actor_token=ehr.id_token(patient="Patient/a-123", source=SOURCE)
                    ).status_code == 200


@pytest.mark.parametrize("aud", [SERVICE, SERVICE + "/token", [SOURCE, SERVICE + "/anything"]])
def test_a_subject_token_addressed_to_this_service_is_invalid_request(exchange, ehr, aud):
    error_of(exchange(subject_token=ehr.access_token(aud=aud)), 400, "invalid_request")


def test_an_actor_token_addressed_to_this_service_is_invalid_request(exchange, ehr):
    error_of(exchange(actor_token=ehr.id_token(client=SERVICE)), 400, "invalid_request")


def test_a_jwt_authorization_grant_presented_as_a_subject_token_is_invalid_request(exchange, ehr):
    grant = ehr.sign(ehr.access_claims(), headers={"typ": "oauth-id-jag+jwt"})
    body = error_of(exchange(subject_token=grant), 400, "invalid_request")
    assert "jwt-bearer" in body["error_description"]


def test_an_id_token_sent_as_the_access_token_is_named_as_such(exchange, ehr):
    body = error_of(exchange(subject_token=ehr.id_token(), actor_token=None, actor_token_type=None), 400,
                    "invalid_request")
    assert "looks like an ID token" in body["error_description"]


def test_smart_configuration_lists_grants_methods_algorithms_endpoints_and_capabilities(http):
    doc = http.get("/.well-known/smart-configuration").get_json()
    assert doc["grant_types_supported"] == ["urn:ietf:params:oauth:grant-type:token-exchange"]
    assert set(doc["token_endpoint_auth_methods_supported"]) == {"client_secret_basic", "client_secret_post",
                                                                 "private_key_jwt"}
    assert {"RS384", "ES384"} <= set(doc["token_endpoint_auth_signing_alg_values_supported"])
    assert doc["introspection_endpoint"] == SERVICE + "/introspect"
    assert doc["revocation_endpoint"] == SERVICE + "/revoke"
    assert {"token-exchange-accesstoken", "client-confidential-symmetric",
            "client-confidential-asymmetric"} <= set(doc["capabilities"])


def test_smart_configuration_lists_s256_pkce_and_the_scope_forms_a_client_may_ask_for(http, exchange):
    """SMART App Launch 2.2 §2.1.2 (what the Inferno SMART discovery checks): code_challenge_methods_supported
    is REQUIRED with S256; scopes_supported lists scope forms this service reads and can grant."""
    from token_exchange import scopes
    doc = http.get("/.well-known/smart-configuration").get_json()
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["scopes_supported"] and all(scopes.parse_scope(s) is not None for s in doc["scopes_supported"])
    assert {s.split("/")[0] for s in doc["scopes_supported"]} == {"patient", "user", "system"}
    assert http.get("/.well-known/oauth-authorization-server").get_json()["scopes_supported"] == \
        doc["scopes_supported"]
    granted = exchange(scope="patient/Observation.rs").get_json()["scope"]
    assert scopes.parse(" ".join(doc["scopes_supported"])).covers(scopes.parse(granted))


def test_unsupported_grant_type_names_only_the_grants_discovery_lists(http, world, ehr, exchange):
    from test_jwt_grant import JWT_BEARER
    for allow in (False, True):
        if allow:
            world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET,
                  "--allow-jwt-grant")
        listed = http.get("/.well-known/smart-configuration").get_json()["grant_types_supported"]
        assert (JWT_BEARER in listed) is allow
        text = error_of(exchange(grant_type="client_credentials"), 400, "unsupported_grant_type")["error_description"]
        named = [g.strip() for g in text.split(":", 1)[1].rstrip(".").split(",")]
        assert named == listed


def test_introspection_returns_fhir_user(exchange, http):
    token = exchange().get_json()["access_token"]
    basic = base64.b64encode(f"hospital-b:{TARGET_SECRET}".encode()).decode()
    body = http.post("/introspect", data={"token": token}, headers={"Authorization": "Basic " + basic}).get_json()
    assert body["active"] is True and body["fhirUser"] == SOURCE + "/Practitioner/p1"


@pytest.mark.parametrize("alg, kty", [("ES256", "EC"), ("ES384", "EC"), ("PS256", "RSA"), ("RS256", "RSA")])
def test_a_target_verifies_tokens_of_every_signing_algorithm_with_nothing_but_the_jwks(world, exchange, http,
                                                                                      alg, kty):
    world("keys", "rotate", "--alg", alg)
    r = exchange()
    assert r.status_code == 200, r.get_json()
    token = r.get_json()["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg
    published = {k["kid"]: k for k in http.get("/jwks").get_json()["keys"]}
    assert published[header["kid"]]["kty"] == kty and published[header["kid"]]["alg"] == alg
    assert claims_of(http, token)["aud"] == TARGET


def test_an_rsa_key_is_also_published_as_its_rs384_twin_for_the_service_s_own_client_assertions(world, http):
    """A JWK's alg binds it to one algorithm: Backend Services assertions (RS384) name the twin."""
    keys = http.get("/jwks").get_json()["keys"]
    (main,) = [k for k in keys if not k["kid"].endswith(".rs384")]
    (twin,) = [k for k in keys if k["kid"] == main["kid"] + ".rs384"]
    assert main["alg"] == "RS256" and twin["alg"] == "RS384" and twin["n"] == main["n"]
    world("keys", "rotate", "--alg", "ES384")
    active = [k for k in http.get("/jwks").get_json()["keys"] if k["alg"] == "ES384"]
    assert len(active) == 1  # a P-384 key signs ES384 itself: no twin


def test_backend_services_assertions_verify_strictly_against_the_published_twin(app, http):
    from token_exchange.keys import client_kid
    key = app.extensions["token_exchange"].store.config().active_key
    assertion = key.client_assertion("te-at-ehr", "https://ehr.example/token")
    header = jwt.get_unverified_header(assertion)
    assert header == {"alg": "RS384", "kid": client_kid(key.kid, key.alg), "typ": "JWT"}
    twin = {k["kid"]: k for k in http.get("/jwks").get_json()["keys"]}[header["kid"]]
    pyjwk = jwt.PyJWK(twin)  # strict: the JWK's alg decides
    claims = jwt.decode(assertion, pyjwk.key, algorithms=[pyjwk.algorithm_name], audience="https://ehr.example/token")
    assert claims["iss"] == claims["sub"] == "te-at-ehr" and claims["exp"] - claims["iat"] <= 300
