"""Issue 3: introspection, revocation, key rotation, opaque subject tokens, the
OpenID form, discovery and the FHIR audit export."""
from __future__ import annotations

import base64
import json
import time
import uuid

import jwt
import pytest

from conftest import (IDT, OTHER_SECRET, SERVICE, TARGET2_SECRET, TARGET_SECRET, TE, VENDOR_SECRET,
                      audit_rows, post_token)
from fakes import SOURCE, TARGET, TARGET2, UPSTREAM
from test_token import claims_of, error_of


def basic(user, pw):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def introspect(http, token, user="hospital-b", pw=TARGET_SECRET):
    return http.post("/introspect", data={"token": token}, headers=basic(user, pw))


@pytest.fixture
def minted(exchange):
    r = exchange()
    assert r.status_code == 200, r.get_json()
    return r.get_json()["access_token"]


# -- introspection ------------------------------------------------------------------
def test_target_introspects_its_token_as_active_with_contract_fields(http, minted):
    r = introspect(http, minted)
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    body = r.get_json()
    assert body["active"] is True
    for k in ("scope", "client_id", "sub", "aud", "iss", "exp", "iat", "jti", "patient", "token_type"):
        assert k in body, k
    assert body["aud"] == TARGET and body["iss"] == SERVICE and body["patient"] == "b-456"
    assert body["client_id"] == "vendor" and body["scope"] == "patient/Observation.rs"


def test_another_target_cannot_introspect_the_token(http, minted):
    assert introspect(http, minted, "clinic-c", TARGET2_SECRET).get_json() == {"active": False}


def test_introspection_without_credentials_is_401(http, minted):
    r = http.post("/introspect", data={"token": minted})
    error_of(r, 401, "invalid_client")


def test_introspection_with_wrong_secret_is_401(http, minted):
    error_of(introspect(http, minted, "hospital-b", "w" * 40), 401, "invalid_client")


def test_vendor_client_credentials_cannot_introspect(http, minted):
    error_of(introspect(http, minted, "vendor", VENDOR_SECRET), 401, "invalid_client")


def test_forged_token_is_inactive(http, minted):
    h, p, s = minted.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=="))
    claims["scope"] = "patient/*.cruds"
    p2 = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert introspect(http, f"{h}.{p2}.{s}").get_json() == {"active": False}
    assert introspect(http, "garbage").get_json() == {"active": False}


def test_expired_token_is_inactive(http, app):
    key = app.extensions["token_exchange"].store.config().active_key
    now = int(time.time())
    expired = key.mint({"iss": SERVICE, "aud": TARGET, "sub": "u", "client_id": "vendor", "scope": "x",
                        "iat": now - 600, "exp": now - 300, "jti": uuid.uuid4().hex})
    assert introspect(http, expired).get_json() == {"active": False}


# -- revocation -----------------------------------------------------------------------
def test_revoked_token_introspects_inactive(http, minted):
    r = http.post("/revoke", data={"token": minted}, headers=basic("vendor", VENDOR_SECRET))
    assert r.status_code == 200
    assert introspect(http, minted).get_json() == {"active": False}


def test_another_client_cannot_revoke_the_token(http, world, ehr, minted):
    world("trust", "add", "--client", "other", "--issuer", ehr.issuer, "--target", TARGET2,
          "--scopes", "user/*.rs", "--upstream-client-id", UPSTREAM)
    r = http.post("/revoke", data={"token": minted}, headers=basic("other", OTHER_SECRET))
    error_of(r, 400, "unauthorized_client")
    assert introspect(http, minted).get_json()["active"] is True


def test_revocation_needs_client_authentication(http, minted):
    error_of(http.post("/revoke", data={"token": minted}), 401, "invalid_client")
    assert introspect(http, minted).get_json()["active"] is True


def test_revoking_an_unknown_token_is_200(http):
    assert http.post("/revoke", data={"token": "nonsense"}, headers=basic("vendor", VENDOR_SECRET)).status_code == 200


# -- key rotation ------------------------------------------------------------------------
def test_rotation_signs_with_new_key_and_old_tokens_keep_verifying(http, world, exchange, minted):
    old_kid = jwt.get_unverified_header(minted)["kid"]
    world("keys", "rotate")
    fresh = exchange().get_json()["access_token"]
    assert jwt.get_unverified_header(fresh)["kid"] != old_kid
    assert claims_of(http, minted)["aud"] == TARGET  # retired key still in /jwks
    assert claims_of(http, fresh)["aud"] == TARGET
    assert introspect(http, minted).get_json()["active"] is True
    states = {k["kid"]: k["state"] for k in json.loads(world("keys", "list", "--json").output)}
    assert states[old_kid] == "retired"


def test_staged_key_is_published_before_it_signs(http, world, exchange):
    staged = world("keys", "stage").output.split()[2]
    assert staged in {k["kid"] for k in http.get("/jwks").get_json()["keys"]}
    assert jwt.get_unverified_header(exchange().get_json()["access_token"])["kid"] != staged
    world("keys", "rotate")
    assert jwt.get_unverified_header(exchange().get_json()["access_token"])["kid"] == staged


def test_retired_key_leaves_jwks_after_grace_and_prune_removes_it(http, world, env, minted):
    old_kid = jwt.get_unverified_header(minted)["kid"]
    world("keys", "rotate")
    env["TOKEN_EXCHANGE_KEY_GRACE"] = "0"
    assert "pruned 1 key" in world("keys", "prune").output
    assert old_kid not in {k["kid"] for k in http.get("/jwks").get_json()["keys"]}
    assert introspect(http, minted).get_json() == {"active": False}


# -- opaque subject tokens ------------------------------------------------------------------
def opaque_response(ehr, **over):
    now = int(time.time())
    body = {"active": True, "sub": "user-1", "client_id": UPSTREAM, "scope": "patient/*.rs",
            "exp": now + 600, "iat": now, "iss": ehr.issuer, "aud": SOURCE}
    body.update(over)
    return {k: v for k, v in body.items() if v is not None}


def test_opaque_token_is_introspected_at_the_id_tokens_issuer(exchange, ehr):
    ehr.opaque["opaque-1"] = opaque_response(ehr)
    r = exchange(subject_token="opaque-1")
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["patient"] == "b-456"
    expected = "Basic " + base64.b64encode(b"te:ehr-introspection-secret-0123456789").decode()
    assert ehr.introspection_auth[-1] == expected


def test_opaque_token_without_id_token_uses_the_one_introspecting_issuer(exchange, ehr):
    ehr.opaque["opaque-2"] = opaque_response(ehr, patient="a-123")
    r = exchange(subject_token="opaque-2", actor_token=None, actor_token_type=None)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["patient"] == "b-456"


def test_inactive_opaque_token_is_invalid_request(exchange, ehr):
    ehr.opaque["opaque-3"] = {"active": False}
    error_of(exchange(subject_token="opaque-3"), 400, "invalid_request")


def test_opaque_token_issuer_unreachable_is_invalid_request(exchange, ehr):
    ehr.opaque["opaque-4"] = opaque_response(ehr)
    id_token = ehr.id_token()
    exchange()  # warm the JWKS cache so only introspection fails
    ehr.down = True
    error_of(exchange(subject_token="opaque-4", actor_token=id_token), 400, "invalid_request")


def test_opaque_token_for_another_upstream_client_is_invalid_request(exchange, ehr):
    ehr.opaque["opaque-5"] = opaque_response(ehr, client_id="another-app")
    error_of(exchange(subject_token="opaque-5"), 400, "invalid_request")


def test_opaque_token_whose_issuer_cannot_be_chosen_is_invalid_request(exchange, world, ehr_b, ehr):
    world("issuer", "add", ehr_b.issuer, "--jwks-uri", ehr_b.issuer + "/jwks", "--source", SOURCE + "/b",
          "--algs", "ES256", "--introspection-endpoint", ehr_b.issuer + "/introspect",
          "--introspection-client-id", "te", "--introspection-secret-env", "EHR_SECRET")
    world("trust", "add", "--client", "vendor", "--issuer", ehr_b.issuer, "--target", TARGET,
          "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
    ehr.opaque["opaque-6"] = opaque_response(ehr)
    ehr.introspection_auth.clear()
    error_of(exchange(subject_token="opaque-6", actor_token=None, actor_token_type=None), 400, "invalid_request")
    assert ehr.introspection_auth == [] and ehr_b.introspection_auth == []  # sent to nobody


def test_opaque_token_with_type_jwt_is_invalid_request(exchange, ehr):
    ehr.opaque["opaque-7"] = opaque_response(ehr)
    error_of(exchange(subject_token="opaque-7", subject_token_type="urn:ietf:params:oauth:token-type:jwt"),
             400, "invalid_request")


# -- the OpenID form -------------------------------------------------------------------------
@pytest.fixture
def openid_world(world, ehr):
    world("trust", "remove", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET)
    world("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET,
          "--scopes", "patient/Observation.rs", "--upstream-client-id", UPSTREAM, "--allow-id-token")
    return world


def test_openid_exchange_is_bounded_by_the_trust_alone(openid_world, http, ehr):
    data = {"grant_type": TE, "subject_token": ehr.id_token(), "subject_token_type": IDT, "resource": TARGET}
    r = post_token(http, data)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["scope"] == "patient/Observation.rs" and r.get_json()["patient"] == "b-456"
    assert "token-exchange-openid" in http.get("/.well-known/smart-configuration").get_json()["capabilities"]


def test_openid_exchange_needs_a_trust_that_allows_it(http, ehr):
    data = {"grant_type": TE, "subject_token": ehr.id_token(), "subject_token_type": IDT, "resource": TARGET}
    error_of(post_token(http, data), 400, "invalid_request")


def test_openid_exchange_refuses_an_access_token_as_id_token(openid_world, http, ehr):
    data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": IDT, "resource": TARGET}
    error_of(post_token(http, data), 400, "invalid_request")


def test_openid_exchange_refuses_id_token_for_another_app(openid_world, http, ehr):
    data = {"grant_type": TE, "subject_token": ehr.id_token(client="another-app"), "subject_token_type": IDT,
            "resource": TARGET}
    error_of(post_token(http, data), 400, "invalid_request")


# -- FHIR audit export ---------------------------------------------------------------------------
def test_audit_export_is_a_valid_fhir_bundle_of_audit_events(exchange, world):
    from fhir.resources.R4B.bundle import Bundle  # R4B's AuditEvent is R4's
    granted = exchange().get_json()
    exchange(scope="patient/Observation.c")
    out = world("audit", "export", "--format", "fhir").output
    bundle = Bundle.model_validate(json.loads(out))
    events = [e.resource for e in bundle.entry]
    assert [e.get_resource_type() for e in events] == ["AuditEvent", "AuditEvent"]
    jti = jwt.decode(granted["access_token"], options={"verify_signature": False})["jti"]
    assert "urn:ietf:params:oauth:jti:" + jti in out
    assert events[0].outcome == "0" and events[1].outcome == "4"
    assert '"value": "a-123"' in out and '"value": "b-456"' in out
    assert granted["access_token"] not in out and VENDOR_SECRET not in out


def test_audit_list_filters_by_time_client_and_outcome(exchange, world):
    exchange()
    rows = audit_rows(world)
    assert audit_rows(world, "--client", "vendor") == rows
    assert audit_rows(world, "--client", "nobody") == []
    assert audit_rows(world, "--outcome", "granted") == rows
    assert audit_rows(world, "--since", "2999-01-01T00:00:00Z") == []


def test_key_sealed_under_another_key_secret_fails_cleanly_with_503(world, env, exchange_factory):
    """Client secrets are peppered, not sealed, so the CLI cannot tell which key secret
    hashed them: a client can authenticate under one key secret while the active key
    was sealed under another. The exchange is then a clean 503, and `keys reseal`
    with the old key secret is the remedy."""
    from token_exchange import create_app
    first, another = "first-key-secret-0123456789abcdef", "another-key-secret-0123456789abcdef"
    env["TOKEN_EXCHANGE_KEY_SECRET"] = another
    world("client", "rotate-secret", "vendor", "--secret-env", "VENDOR_SECRET")  # peppered with another
    env["TOKEN_EXCHANGE_KEY_SECRET"] = first
    world("keys", "rotate")  # the active key is sealed under the first secret
    env["TOKEN_EXCHANGE_KEY_SECRET"] = another
    error_of(exchange_factory(create_app(env=env).test_client()), 503, "temporarily_unavailable")
    env["OLD_KEY_SECRET"] = first
    world("keys", "reseal", "--old-secret-env", "OLD_KEY_SECRET")  # the documented remedy
    assert exchange_factory(create_app(env=env).test_client()).status_code == 200


def test_openid_exchange_refuses_an_access_token_without_scope(openid_world, http, ehr):
    token = ehr.sign(ehr.access_claims(scope=None, aud=UPSTREAM))
    data = {"grant_type": TE, "subject_token": token, "subject_token_type": IDT, "resource": TARGET}
    error_of(post_token(http, data), 400, "invalid_request")
