"""DPoP required and DPoP-bound inputs (RFC 9449 §5.2, §6): clients and trusts that
require a proof (set with the real CLI and with config apply), and EHR tokens bound
to the app's key (cnf.jkt in a JWT, or in the issuer's introspection answer)
accepted only with a proof by that key, the minted token bound to the same key."""
from __future__ import annotations

import json
import time

import pytest

from conftest import AT, TE, audit_rows, post_token
from dpop_helpers import Prover
from fakes import SOURCE, TARGET, UPSTREAM
from test_jwt_grant import JWT_BEARER, make_grant
from test_token import claims_of, error_of


@pytest.fixture(scope="module")
def key():
    return Prover("ES256")


@pytest.fixture(scope="module")
def other():
    return Prover("ES256")


def proof(p):
    return {"DPoP": p.proof()}


def required(body):
    assert "DPoP proof is required" in body["error_description"], body
    return body


# -- --require-dpop -----------------------------------------------------------------------------
def test_client_require_dpop_refuses_requests_without_a_proof_as_invalid_request(world, exchange, key):
    world("client", "update", "vendor", "--require-dpop")
    assert json.loads(world("client", "show", "vendor", "--json").output)["require_dpop"] is True
    required(error_of(exchange(), 400, "invalid_request"))
    r = exchange(headers=proof(key))
    assert r.status_code == 200 and r.get_json()["token_type"] == "DPoP"
    world("client", "update", "vendor", "--no-require-dpop")
    assert json.loads(world("client", "show", "vendor", "--json").output)["require_dpop"] is False
    assert exchange().get_json()["token_type"] == "Bearer"


def test_client_add_require_dpop_is_shown_in_list(world):
    world("client", "add", "dpop-app", "--generate-secret", "--require-dpop")
    rows = {c["client_id"]: c for c in json.loads(world("client", "list", "--json").output)}
    assert rows["dpop-app"]["require_dpop"] is True and rows["vendor"]["require_dpop"] is False


def test_client_require_dpop_is_checked_before_the_grant_type(world, http):
    world("client", "update", "vendor", "--require-dpop")
    required(error_of(post_token(http, {"grant_type": "password"}), 400, "invalid_request"))


def test_trust_require_dpop_refuses_requests_without_a_proof_as_invalid_request(world, exchange, ehr, key):
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--require-dpop")
    (t,) = json.loads(world("trust", "list", "--json").output)
    assert t["require_dpop"] is True
    required(error_of(exchange(), 400, "invalid_request"))
    assert exchange(headers=proof(key)).get_json()["token_type"] == "DPoP"
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--no-require-dpop")
    assert exchange().status_code == 200


def test_trust_require_dpop_holds_for_the_jwt_grant(world, http, ehr, key):
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--allow-jwt-grant",
          "--require-dpop")
    form = {"grant_type": JWT_BEARER, "resource": TARGET}
    required(error_of(post_token(http, dict(form, assertion=make_grant(ehr))), 400, "invalid_request"))
    r = post_token(http, dict(form, assertion=make_grant(ehr)), headers=proof(key))
    assert r.status_code == 200 and r.get_json()["token_type"] == "DPoP"


def test_trust_add_require_dpop_only_binds_that_trust(world, exchange, ehr, key):
    from fakes import TARGET2
    world("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET2, "--scopes",
          "patient/*.rs", "--upstream-client-id", UPSTREAM, "--require-dpop")
    required(error_of(exchange(resource=TARGET2, scope="patient/*.rs"), 400, "invalid_request"))
    assert exchange().status_code == 200  # the trust for TARGET requires nothing


def test_config_export_and_apply_carry_require_dpop(world, tmp_path, ehr):
    doc = json.loads(world("config", "export").output)
    assert all(c["require_dpop"] is False for c in doc["clients"])
    assert all(t["require_dpop"] is False for t in doc["trusts"])
    for c in doc["clients"]:
        c["secret_env"] = "VENDOR_SECRET" if c["client_id"] == "vendor" else "OTHER_SECRET"
        if c["client_id"] == "vendor":
            c["require_dpop"] = True
    doc["trusts"][0]["require_dpop"] = True
    for i in doc["issuers"]:
        i["introspection_secret_env"] = "EHR_SECRET"
    for t in doc["targets"]:
        t["introspection_secret_env"] = "TARGET_SECRET" if t["base_url"] == TARGET else "TARGET2_SECRET"
    (tmp_path / "c.json").write_text(json.dumps(doc))
    out = world("config", "apply", str(tmp_path / "c.json")).output
    assert "require_dpop false → true" in out
    assert json.loads(world("client", "show", "vendor", "--json").output)["require_dpop"] is True
    assert json.loads(world("trust", "list", "--json").output)[0]["require_dpop"] is True
    assert world("config", "apply", str(tmp_path / "c.json")).output.strip() == "no changes"


# -- bound subject and actor tokens ---------------------------------------------------------------
def test_a_subject_token_bound_to_the_proof_key_is_exchanged_and_the_token_bound_to_it(exchange, http, ehr, key):
    r = exchange(subject_token=ehr.access_token(cnf={"jkt": key.jkt}), headers=proof(key))
    assert r.status_code == 200, r.get_json()
    assert claims_of(http, r.get_json()["access_token"])["cnf"] == {"jkt": key.jkt}


def test_a_subject_token_bound_to_another_key_is_invalid_request(exchange, ehr, key, other):
    error_of(exchange(subject_token=ehr.access_token(cnf={"jkt": key.jkt}), headers=proof(other)),
             400, "invalid_request")


def test_a_bound_subject_token_without_a_proof_is_invalid_request(exchange, ehr, key, world):
    body = error_of(exchange(subject_token=ehr.access_token(cnf={"jkt": key.jkt})), 400, "invalid_request")
    assert "DPoP" in body["error_description"]
    (row,) = audit_rows(world)
    assert row["error"] == "invalid_request" and row["dpop_jkt"] is None


def test_a_bound_actor_token_needs_a_proof_by_its_key(exchange, ehr, key, other):
    bound = ehr.id_token(cnf={"jkt": key.jkt})
    assert exchange(actor_token=bound, headers=proof(key)).status_code == 200
    error_of(exchange(actor_token=ehr.id_token(cnf={"jkt": key.jkt}), headers=proof(other)), 400, "invalid_request")
    error_of(exchange(actor_token=ehr.id_token(cnf={"jkt": key.jkt})), 400, "invalid_request")


@pytest.mark.parametrize("cnf", [{"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}, {"jwk": {"kty": "EC"}},
                                 "jkt", {"jkt": 42}, {"jkt": ""}])
def test_a_token_bound_some_other_way_than_jkt_is_invalid_request(exchange, ehr, key, cnf):
    body = error_of(exchange(subject_token=ehr.access_token(cnf=cnf), headers=proof(key)), 400, "invalid_request")
    assert "cnf" in body["error_description"]


def opaque(ehr, name, **over):
    now = int(time.time())
    ehr.opaque[name] = dict({"active": True, "sub": "user-1", "client_id": UPSTREAM, "scope": "patient/*.rs",
                             "exp": now + 600, "iat": now, "iss": ehr.issuer, "aud": SOURCE}, **over)
    return name


def test_an_opaque_token_bound_in_its_introspection_needs_a_proof_by_that_key(exchange, http, ehr, key, other):
    r = exchange(subject_token=opaque(ehr, "bound-1", cnf={"jkt": key.jkt}), headers=proof(key))
    assert r.status_code == 200, r.get_json()
    assert claims_of(http, r.get_json()["access_token"])["cnf"] == {"jkt": key.jkt}
    error_of(exchange(subject_token=opaque(ehr, "bound-2", cnf={"jkt": key.jkt}), headers=proof(other)),
             400, "invalid_request")
    error_of(exchange(subject_token=opaque(ehr, "bound-3", cnf={"jkt": key.jkt})), 400, "invalid_request")
    error_of(exchange(subject_token=opaque(ehr, "bound-4", cnf={"x5t#S256": "abc"}), headers=proof(key)),
             400, "invalid_request")


# -- a bound JWT authorization grant ------------------------------------------------------------
@pytest.fixture
def grant(world, http, ehr):
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--allow-jwt-grant")
    return lambda assertion, headers=None: post_token(http, {"grant_type": JWT_BEARER, "assertion": assertion,
                                                             "resource": TARGET}, headers=headers)


def test_a_bound_jwt_grant_with_a_proof_by_its_key_mints_a_token_bound_to_it(grant, http, ehr, key):
    r = grant(make_grant(ehr, cnf={"jkt": key.jkt}), proof(key))
    assert r.status_code == 200, r.get_json()
    assert claims_of(http, r.get_json()["access_token"])["cnf"] == {"jkt": key.jkt}


def test_a_bound_jwt_grant_with_another_key_is_invalid_grant(grant, ehr, key, other):
    error_of(grant(make_grant(ehr, cnf={"jkt": key.jkt}), proof(other)), 400, "invalid_grant")


def test_a_bound_jwt_grant_without_a_proof_is_invalid_grant(grant, ehr, key):
    error_of(grant(make_grant(ehr, cnf={"jkt": key.jkt})), 400, "invalid_grant")


def test_a_jwt_grant_bound_some_other_way_is_invalid_request(grant, ehr, key):
    error_of(grant(make_grant(ehr, cnf={"x5t#S256": "abc"}), proof(key)), 400, "invalid_request")


def test_a_refused_bound_grant_leaves_its_jti_unspent(grant, ehr, key, other):
    assertion = make_grant(ehr, cnf={"jkt": key.jkt})
    error_of(grant(assertion, proof(other)), 400, "invalid_grant")
    assert grant(assertion, proof(key)).status_code == 200


def test_explain_reports_a_bound_subject_token_without_refusing_it(world, ehr, key, tmp_path):
    (tmp_path / "at").write_text(ehr.access_token(cnf={"jkt": key.jkt}))
    (tmp_path / "id").write_text(ehr.id_token())
    r = world("explain", "--client", "vendor", "--subject-token", str(tmp_path / "at"), "--actor-token",
              str(tmp_path / "id"), "--resource", TARGET, "--json", check=False)
    assert r.exit_code == 0, r.output
    assert key.jkt in r.output


def test_explain_says_when_the_client_requires_a_proof(world, ehr, tmp_path):
    (tmp_path / "at").write_text(ehr.access_token())
    (tmp_path / "id").write_text(ehr.id_token())
    argv = ["explain", "--client", "vendor", "--subject-token", str(tmp_path / "at"), "--actor-token",
            str(tmp_path / "id"), "--resource", TARGET, "--json"]
    (client,) = [s for s in json.loads(world(*argv).output)["steps"] if s["step"] == "client"]
    assert "DPoP" not in client["detail"]
    world("client", "update", "vendor", "--require-dpop")
    report = json.loads(world(*argv).output)
    (client,) = [s for s in report["steps"] if s["step"] == "client"]
    assert client["outcome"] == "held" and "--require-dpop" in client["detail"]
    assert report["decision"]["outcome"] == "granted"  # as POST /token with a valid proof


def test_grant_type_is_still_named_when_no_proof_is_needed(http):
    error_of(post_token(http, {"grant_type": TE, "subject_token_type": AT}), 400, "invalid_request")
