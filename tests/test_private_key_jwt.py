"""private_key_jwt (RFC 7523 §2.2) as SMART Backend Services profiles it."""
from __future__ import annotations

import json
import threading
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from conftest import AT, IDT, SERVICE, TE, post_token
from fakes import TARGET, UPSTREAM, FakeEHR, free_port, new_key
from test_token import error_of

ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class VendorKeys:
    """A vendor's key pair; its public JWKS as a file or served over HTTP."""

    def __init__(self, alg, kid):
        self.alg, self.kid, self.key = alg, kid, new_key(alg)

    def jwk(self):
        jwk = json.loads(jwt.get_algorithm_by_name(self.alg).to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, alg=self.alg, use="sig")
        return jwk

    def assertion(self, client_id="backend", aud=SERVICE + "/token", ttl=240, jti="fresh", headers=None,
                  alg=None, key=None, **extra):
        now = int(time.time())
        claims = {"iss": client_id, "sub": client_id, "aud": aud, "exp": now + ttl, "iat": now,
                  "jti": uuid.uuid4().hex if jti == "fresh" else jti}
        claims.update(extra)
        h = {"kid": self.kid, "typ": "JWT"}
        h.update(headers or {})
        return jwt.encode({k: v for k, v in claims.items() if v is not None}, key or self.key,
                          algorithm=alg or self.alg, headers=h)


@pytest.fixture
def rs384(tmp_path, world, ehr):
    keys = VendorKeys("RS384", "vendor-rs384")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [keys.jwk()]}))
    world("client", "add", "backend", "--jwks-file", str(path))
    world("trust", "add", "--client", "backend", "--issuer", ehr.issuer, "--target", TARGET,
          "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
    return keys


def form(ehr, assertion, **over):
    d = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
         "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET,
         "client_assertion_type": ASSERTION, "client_assertion": assertion}
    d.update(over)
    return d


def test_rs384_assertion_with_inline_jwks_authenticates(http, ehr, rs384):
    r = post_token(http, form(ehr, rs384.assertion()), auth=None)
    assert r.status_code == 200, r.get_json()
    assert jwt.decode(r.get_json()["access_token"], options={"verify_signature": False})["client_id"] == "backend"


def test_issuer_url_is_an_accepted_assertion_audience(http, ehr, rs384):
    assert post_token(http, form(ehr, rs384.assertion(aud=SERVICE)), auth=None).status_code == 200


def test_es384_assertion_with_jwks_uri_authenticates(http, ehr, world):
    vendor = FakeEHR("vendor-keys", alg="ES384")  # serves its public keys at /jwks
    try:
        world("client", "add", "backend", "--jwks-uri", vendor.issuer + "/jwks")
        world("trust", "add", "--client", "backend", "--issuer", ehr.issuer, "--target", TARGET,
              "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
        now = int(time.time())
        a = vendor.sign({"iss": "backend", "sub": "backend", "aud": SERVICE + "/token", "exp": now + 200,
                         "jti": uuid.uuid4().hex})
        r = post_token(http, form(ehr, a), auth=None)
        assert r.status_code == 200, r.get_json()
        hits = vendor.jwks_hits
        a2 = vendor.sign({"iss": "backend", "sub": "backend", "aud": SERVICE + "/token", "exp": now + 200,
                          "jti": uuid.uuid4().hex})
        assert post_token(http, form(ehr, a2), auth=None).status_code == 200
        assert vendor.jwks_hits == hits  # cached
        jku_ok = vendor.sign({"iss": "backend", "sub": "backend", "aud": SERVICE + "/token", "exp": now + 200,
                              "jti": uuid.uuid4().hex}, headers={"jku": vendor.issuer + "/jwks"})
        assert post_token(http, form(ehr, jku_ok), auth=None).status_code == 200
        jku_bad = vendor.sign({"iss": "backend", "sub": "backend", "aud": SERVICE + "/token", "exp": now + 200,
                               "jti": uuid.uuid4().hex}, headers={"jku": "http://127.0.0.1:9/evil"})
        error_of(post_token(http, form(ehr, jku_bad), auth=None), 401, "invalid_client")
    finally:
        vendor.stop()


def test_replayed_assertion_is_invalid_client(http, ehr, rs384):
    a = rs384.assertion()
    assert post_token(http, form(ehr, a), auth=None).status_code == 200
    error_of(post_token(http, form(ehr, a), auth=None), 401, "invalid_client")


def test_replay_is_refused_even_when_first_use_was_refused_later(http, ehr, rs384):
    a = rs384.assertion()
    error_of(post_token(http, form(ehr, a, resource="https://nowhere.example/fhir"), auth=None), 400,
             "invalid_target")
    error_of(post_token(http, form(ehr, a), auth=None), 401, "invalid_client")


@pytest.mark.parametrize("over", [
    {"aud": "https://other.example/token"},
    {"aud": "http://evil.example/token"},
    {"ttl": 900},  # exp more than five minutes ahead
    {"ttl": -120},  # expired
    {"iss": "someone-else"},
    {"client_id": "nobody"},
    {"headers": {"kid": "unknown-kid"}},
    {"headers": {"jku": "http://127.0.0.1:9/jwks"}},
    {"jti": None},
])
def test_misaddressed_or_malformed_assertion_is_invalid_client(http, ehr, rs384, over):
    over = dict(over)
    if "iss" in over:
        a = rs384.assertion(**{k: v for k, v in over.items() if k != "iss"})
        # re-sign with a different iss than sub
        claims = jwt.decode(a, options={"verify_signature": False})
        claims["iss"] = over["iss"]
        a = jwt.encode(claims, rs384.key, algorithm="RS384", headers={"kid": rs384.kid})
    else:
        a = rs384.assertion(**over)
    error_of(post_token(http, form(ehr, a), auth=None), 401, "invalid_client")


def test_assertion_signed_by_another_key_is_invalid_client(http, ehr, rs384):
    error_of(post_token(http, form(ehr, rs384.assertion(key=new_key("RS384"))), auth=None), 401, "invalid_client")


def test_assertion_with_hmac_alg_is_invalid_client(http, ehr, rs384):
    a = jwt.encode({"iss": "backend", "sub": "backend", "aud": SERVICE + "/token", "exp": int(time.time()) + 60,
                    "jti": "x"}, "secret" * 8, algorithm="HS256", headers={"kid": rs384.kid})
    error_of(post_token(http, form(ehr, a), auth=None), 401, "invalid_client")


def test_assertion_alg_none_is_invalid_client(http, ehr, rs384):
    a = jwt.encode({"iss": "backend", "sub": "backend", "aud": SERVICE + "/token", "exp": int(time.time()) + 60,
                    "jti": "x"}, None, algorithm="none", headers={"kid": rs384.kid})
    error_of(post_token(http, form(ehr, a), auth=None), 401, "invalid_client")


def test_wrong_assertion_type_is_invalid_client(http, ehr, rs384):
    error_of(post_token(http, form(ehr, rs384.assertion(), client_assertion_type="urn:x"), auth=None),
             401, "invalid_client")


def test_assertion_plus_basic_is_invalid_request(http, ehr, rs384):
    error_of(post_token(http, form(ehr, rs384.assertion()), auth=("backend", "x" * 40)), 400, "invalid_request")


def test_secret_client_cannot_use_an_assertion(http, ehr, rs384):
    a = rs384.assertion(client_id="vendor")
    error_of(post_token(http, form(ehr, a), auth=None), 401, "invalid_client")


def test_assertion_client_cannot_use_a_secret(http, ehr, rs384):
    error_of(post_token(http, form(ehr, "x", client_assertion=None, client_assertion_type=None),
                        auth=("backend", "x" * 40)), 401, "invalid_client")


@pytest.fixture
def live(app):
    """The app on a real loopback socket, for HTTP clients such as Authlib's and requests."""
    from werkzeug.serving import make_server
    port = free_port()
    srv = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}"
    srv.shutdown()


def test_authlib_oauth2session_with_private_key_jwt_works_as_readme_shows(live, ehr, rs384, app):
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"<!-- authlib-example:start -->\s*```python\n(.*?)```", readme, re.S).group(1)
    pem = rs384.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode()
    # The service's issuer is http://te.test; the live socket stands in for it here.
    scope = {"CLIENT_ID": "backend", "PRIVATE_KEY_PEM": pem, "KID": rs384.kid, "TOKEN_ENDPOINT": live + "/token",
             "ACCESS_TOKEN": ehr.access_token(), "ID_TOKEN": ehr.id_token()}
    settings = app.extensions["token_exchange"].settings
    object.__setattr__(settings, "issuer", live)  # the assertion's aud must be this token endpoint
    exec(compile(code, "README.md", "exec"), scope)
    token = scope["token"]
    assert token["patient"] == "b-456" and token["token_type"] == "Bearer"


def test_plain_requests_with_private_key_jwt_authenticates(live, ehr, rs384):
    import requests
    r = requests.post(live + "/token", data=form(ehr, rs384.assertion()), timeout=10)
    assert r.status_code == 200, r.text
