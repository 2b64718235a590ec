"""DPoP (RFC 9449) at POST /token: a proof binds the minted token to the client's key
(cnf.jkt, token_type DPoP); every check of RFC 9449 §4.3 refuses a bad proof with
invalid_dpop_proof, right after client authentication; without a proof the answer is
the bearer answer it always was."""
from __future__ import annotations

import json
import time

import jwt
import pytest

from conftest import AT, SERVICE, TE, VENDOR_SECRET, audit_rows, post_token
from dpop_helpers import TOKEN_ENDPOINT, Prover, b64, rfc7638, unsigned
from fakes import TARGET
from test_jwt_grant import JWT_BEARER, make_grant
from test_lifecycle import introspect
from test_observability import decisions  # noqa: F401 - the fixture
from test_token import claims_of, error_of


@pytest.fixture(scope="module")
def prover():
    return Prover("ES256")


def with_proof(proof):
    return {"DPoP": proof}


# -- a proof binds the token ---------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA"])
def test_a_valid_proof_binds_the_minted_token_to_its_key_with_cnf_jkt(exchange, http, alg):
    p = Prover(alg)
    r = exchange(headers=with_proof(p.proof()))
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["token_type"] == "DPoP"
    claims = claims_of(http, body["access_token"])
    assert claims["cnf"] == {"jkt": p.jkt} == {"jkt": rfc7638(p.jwk)}


def test_introspection_of_a_bound_token_returns_cnf_and_token_type_dpop(exchange, http, prover):
    token = exchange(headers=with_proof(prover.proof())).get_json()["access_token"]
    answer = introspect(http, token).get_json()
    assert answer["active"] is True and answer["token_type"] == "DPoP" and answer["cnf"] == {"jkt": prover.jkt}


def test_without_a_proof_the_answer_and_token_are_bearer_as_before(exchange, http, world):
    r = exchange()
    body = r.get_json()
    assert list(body) == ["access_token", "token_type", "expires_in", "scope", "issued_token_type", "patient"]
    assert body["token_type"] == "Bearer" and "cnf" not in claims_of(http, body["access_token"])
    answer = introspect(http, body["access_token"]).get_json()
    assert answer["token_type"] == "Bearer" and "cnf" not in answer
    assert "DPoP-Nonce" not in r.headers
    (row,) = audit_rows(world)
    assert row["dpop_jkt"] is None


def test_the_audit_record_names_the_proof_key_thumbprint(exchange, world, prover):
    assert exchange(headers=with_proof(prover.proof())).status_code == 200
    error_of(exchange(headers=with_proof(prover.proof()), scope="patient/Observation.c"), 400, "invalid_scope")
    granted, refused = audit_rows(world)
    assert granted["dpop_jkt"] == prover.jkt and refused["dpop_jkt"] == prover.jkt


def test_the_fhir_audit_export_names_the_proof_key(exchange, world, prover):
    assert exchange(headers=with_proof(prover.proof())).status_code == 200
    bundle = json.loads(world("audit", "export", "--format", "fhir").output)
    details = [d for e in bundle["entry"] for ent in e["resource"].get("entity", []) for d in ent.get("detail", [])]
    assert {"type": "dpop-jkt", "valueString": prover.jkt} in details


def test_the_jwt_grant_with_a_proof_mints_a_bound_token(http, world, ehr, prover):
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--allow-jwt-grant")
    r = post_token(http, {"grant_type": JWT_BEARER, "assertion": make_grant(ehr), "resource": TARGET},
                   headers=with_proof(prover.proof()))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["token_type"] == "DPoP"
    assert claims_of(http, r.get_json()["access_token"])["cnf"] == {"jkt": prover.jkt}


@pytest.mark.parametrize("path", ["/.well-known/oauth-authorization-server", "/.well-known/smart-configuration"])
def test_discovery_lists_the_asymmetric_dpop_signing_algorithms(http, path):
    algs = http.get(path).get_json()["dpop_signing_alg_values_supported"]
    assert {"ES256", "ES384", "RS256", "PS256"} <= set(algs)
    assert not any(a == "none" or a.startswith("HS") for a in algs)


def test_metrics_count_dpop_and_bearer_tokens(exchange, http, prover):
    assert exchange().status_code == 200
    assert exchange(headers=with_proof(prover.proof())).status_code == 200
    assert exchange(headers=with_proof(prover.proof())).status_code == 200
    text = http.get("/metrics").get_data(as_text=True)
    assert 'token_exchange_tokens_total{token_type="Bearer"} 1.0' in text
    assert 'token_exchange_tokens_total{token_type="DPoP"} 2.0' in text


# -- RFC 9449 §4.3, each check ------------------------------------------------------------------
def refused(exchange, proof, **kw):
    return error_of(exchange(headers=with_proof(proof), **kw), 400, "invalid_dpop_proof")


def test_two_dpop_headers_are_invalid_dpop_proof(http, ehr, prover):
    import base64
    form = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT, "resource": TARGET}
    basic = "Basic " + base64.b64encode(f"vendor:{VENDOR_SECRET}".encode()).decode()
    r = http.post("/token", data=form, headers=[("Authorization", basic), ("DPoP", prover.proof()),
                                                 ("DPoP", prover.proof())])
    error_of(r, 400, "invalid_dpop_proof")


@pytest.mark.parametrize("junk", ["", "not-a-jwt", "a.b", "a.b.c", "e30.e30.", "x" * 9000])
def test_a_proof_that_is_not_a_jwt_is_invalid_dpop_proof(exchange, junk):
    refused(exchange, junk)


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "drop", 1])
def test_a_proof_without_typ_dpop_jwt_is_invalid_dpop_proof(exchange, prover, typ):
    refused(exchange, prover.proof(typ=typ))


def test_a_proof_with_alg_none_is_invalid_dpop_proof(exchange, prover):
    now = int(time.time())
    refused(exchange, unsigned({"typ": "dpop+jwt", "alg": "none", "jwk": prover.jwk},
                               {"jti": "n1", "htm": "POST", "htu": TOKEN_ENDPOINT, "iat": now}))


def test_a_proof_with_an_hmac_alg_is_invalid_dpop_proof(exchange, prover):
    refused(exchange, prover.proof(alg="HS256", jwk={"kty": "oct", "k": "a2trazExMTExMTExMTExMTExMTExMTExMTExMTEx"}))


@pytest.mark.parametrize("alg", ["ES256K", "RSA-OAEP", "", None])
def test_a_proof_with_an_unsupported_alg_is_invalid_dpop_proof(exchange, prover, alg):
    refused(exchange, prover.proof(alg=alg if alg is not None else "drop"))


def test_a_proof_without_jwk_is_invalid_dpop_proof(exchange, prover):
    refused(exchange, prover.proof(jwk="drop"))


def test_a_proof_whose_jwk_has_a_private_member_is_invalid_dpop_proof(exchange, prover):
    d = prover.key.private_numbers().private_value.to_bytes(32, "big")
    refused(exchange, prover.proof(jwk=dict(prover.jwk, d=b64(d))))


@pytest.mark.parametrize("n", ["!!", "AQAB", "A" * 1000, 42])
def test_a_proof_whose_rsa_key_is_malformed_or_out_of_bounds_is_invalid_dpop_proof(exchange, n):
    rsa = Prover("RS256")
    refused(exchange, rsa.proof(jwk=dict(rsa.jwk, n=n)))


def test_a_proof_whose_jwk_does_not_fit_its_alg_is_invalid_dpop_proof(exchange):
    rsa = Prover("RS256")
    refused(exchange, rsa.proof(alg="ES256"))  # an RSA jwk for an EC algorithm
    p384 = Prover("ES384")
    refused(exchange, p384.proof(alg="ES256", jwk=p384.jwk))  # a P-384 key for ES256


def test_a_proof_signed_by_another_key_than_its_jwk_is_invalid_dpop_proof(exchange, prover):
    refused(exchange, prover.proof(key=Prover("ES256").key))


def test_a_proof_without_jti_is_invalid_dpop_proof(exchange, prover):
    refused(exchange, prover.proof(jti="drop"))


@pytest.mark.parametrize("htm", ["GET", "post", "drop"])
def test_a_proof_for_another_method_is_invalid_dpop_proof(exchange, prover, htm):
    refused(exchange, prover.proof(htm=htm))


@pytest.mark.parametrize("htu", ["http://te.test/introspect", "https://te.test/token", "http://other.test/token",
                                 "http://te.test:8080/token", "/token", "drop"])
def test_a_proof_for_another_url_is_invalid_dpop_proof(exchange, prover, htu):
    refused(exchange, prover.proof(htu=htu))


@pytest.mark.parametrize("htu", ["HTTP://TE.TEST/token", "http://te.test:80/token", "http://te.test/a/../token",
                                 "http://te.test/%74oken", "http://te.test/token?x=1", "http://te.test/token#f"])
def test_htu_is_compared_after_rfc3986_normalisation_without_query_and_fragment(exchange, prover, htu):
    r = exchange(headers=with_proof(prover.proof(htu=htu)))
    assert r.status_code == 200, r.get_json()


def test_htu_is_the_published_token_endpoint_whatever_host_the_request_came_to(http, exchange, prover):
    """Behind a proxy: the request reaches the service as localhost; the proof names the
    token_endpoint that discovery publishes."""
    published = http.get("/.well-known/oauth-authorization-server").get_json()["token_endpoint"]
    assert published == SERVICE + "/token"
    assert exchange(headers=with_proof(prover.proof(htu=published))).status_code == 200
    refused(exchange, prover.proof(htu="http://localhost/token"))


@pytest.mark.parametrize("offset", [-61 - 5, 61 + 5, 3600])
def test_a_proof_whose_iat_is_outside_60_seconds_is_invalid_dpop_proof(exchange, prover, offset):
    refused(exchange, prover.proof(iat=int(time.time()) + offset))


@pytest.mark.parametrize("iat", ["now", None, [], 1e400, 10 ** 400, -(10 ** 400)])
def test_a_proof_whose_iat_is_not_a_number_is_invalid_dpop_proof(exchange, prover, iat):
    refused(exchange, prover.proof(iat="drop" if iat is None else iat))


def test_a_replayed_proof_is_invalid_dpop_proof(exchange, prover):
    proof = prover.proof()
    assert exchange(headers=with_proof(proof)).status_code == 200
    refused(exchange, proof)


def test_a_proof_is_spent_even_when_the_exchange_is_refused_later(exchange, prover):
    proof = prover.proof()
    error_of(exchange(headers=with_proof(proof), scope="patient/Observation.c"), 400, "invalid_scope")
    refused(exchange, proof)


def test_the_proof_is_checked_after_client_authentication_and_before_the_grant_type(http, prover):
    r = post_token(http, {"grant_type": "password"}, auth=("vendor", "wrong"), headers=with_proof("junk"))
    error_of(r, 401, "invalid_client")
    r = post_token(http, {"grant_type": "password"}, headers=with_proof("junk"))
    error_of(r, 400, "invalid_dpop_proof")
    r = post_token(http, {"grant_type": "password"}, headers=with_proof(prover.proof()))
    error_of(r, 400, "unsupported_grant_type")


def test_a_refused_proof_is_logged_with_its_reason_and_audited(exchange, world, prover, decisions):  # noqa: F811
    proof = prover.proof(htm="GET")
    refused(exchange, proof)
    (line,) = decisions
    rec = json.loads(line)
    assert rec["msg"] == "refused" and rec["error"] == "invalid_dpop_proof" and "htm" in rec["reason"]
    assert proof not in line and proof.split(".")[2] not in line
    (row,) = audit_rows(world)
    assert row["error"] == "invalid_dpop_proof" and row["client_id"] == "vendor" and "htm" in row["reason"]


def test_a_dpop_refusal_never_repeats_the_proof_or_a_key(exchange, prover):
    proof = prover.proof(key=Prover("ES256").key)
    body = refused(exchange, proof)
    text = json.dumps(body)
    assert proof not in text and prover.jwk["x"] not in text


def test_jwt_library_agrees_the_minted_cnf_is_the_proof_key_thumbprint(exchange, http, prover):
    """A target checking a bound token (RFC 9449 §7) compares cnf.jkt with the thumbprint of
    the key of the proof it receives: the same RFC 7638 value."""
    token = exchange(headers=with_proof(prover.proof())).get_json()["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["cnf"]["jkt"] == prover.jkt


def test_a_replayed_proof_is_invalid_dpop_proof_even_when_the_request_is_wrong_otherwise(exchange, world, prover):
    """A replayed proof is refused as one (RFC 9449 §4.3 (12)), whatever else the request
    gets wrong: here a resource no trust covers, which without the replay is invalid_target."""
    proof = prover.proof()
    assert exchange(headers=with_proof(proof)).status_code == 200
    error_of(exchange(headers=with_proof(prover.proof()), resource="https://fhir.nowhere.example/fhir"), 400,
             "invalid_target")
    body = refused(exchange, proof, resource="https://fhir.nowhere.example/fhir")
    assert body["error_description"] == "The DPoP proof was already used; make a new proof for each request."
    refusal = audit_rows(world)[-1]
    assert refusal["error"] == "invalid_dpop_proof" and "earlier request" in refusal["reason"]


def test_a_replayed_proof_is_refused_at_the_commit_of_its_record_and_nothing_is_issued(exchange, world, prover):
    """The jti is spent by the decision's audit record (unique per proof key), committed
    before the answer: the replay's token is minted but its record cannot be committed, so
    it is refused and its token never leaves the service; its refusal is recorded."""
    proof = prover.proof()
    first = exchange(headers=with_proof(proof)).get_json()
    body = refused(exchange, proof)
    assert "access_token" not in body
    granted, lost = audit_rows(world)
    assert granted["outcome"] == "granted" and lost["outcome"] == "refused" and lost["jti"] is None
    assert granted["jti"] == jwt.decode(first["access_token"], options={"verify_signature": False})["jti"]
    assert lost["error"] == "invalid_dpop_proof" and "earlier request" in lost["reason"]
