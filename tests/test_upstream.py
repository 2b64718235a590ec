"""The one outbound HTTP client (token_exchange/upstream.py): a total deadline that a
trickling server cannot stretch, a size cap, no cookies, no redirects, bounded JSON;
through the service's HTTP surface where an upstream is called, and directly for the
API later features build on (a deadline shared by several calls)."""
from __future__ import annotations

import json
import time
import uuid
from types import SimpleNamespace

import pytest

from conftest import AT, SERVICE, TE, post_token
from fakes import TARGET, UPSTREAM, FakeEHR, Scripted, new_key
from test_private_key_jwt import ASSERTION
from test_token import error_of


@pytest.fixture(autouse=True)
def _hostile_reset(ehr):
    yield
    ehr.reset_hostile()


@pytest.fixture
def app_with(env, world):
    from token_exchange import create_app
    made = []

    def make(**settings):
        app = create_app(env=dict(env, **settings))
        made.append(app)
        return app.test_client()
    yield make
    for app in made:
        app.extensions["token_exchange"].store.close()
        app.extensions["token_exchange"].engine.dispose()


def timed(fn):
    t = time.monotonic()
    out = fn()
    return out, time.monotonic() - t


def exchange_on(http, ehr, auth=("vendor", "vendor-A-secret-0123456789abcdef0123"), **over):
    data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
            "actor_token": ehr.id_token(), "actor_token_type": "urn:ietf:params:oauth:token-type:id_token",
            "resource": TARGET}
    data.update(over)
    return post_token(http, {k: v for k, v in data.items() if v is not None}, auth=auth)


# -- the total deadline ---------------------------------------------------------------------
def test_an_issuer_trickling_its_jwks_is_cut_off_at_the_deadline(app_with, ehr):
    """requests' timeout bounds each read: a JWKS sent one byte every 20 ms (~20 s in
    all) held the exchange for 20 s with TOKEN_EXCHANGE_HTTP_TIMEOUT=1."""
    http = app_with(TOKEN_EXCHANGE_HTTP_TIMEOUT="1")
    ehr.replies["jwks"] = Scripted(trickle=0.02)
    r, took = timed(lambda: exchange_on(http, ehr))
    body = error_of(r, 400, "invalid_request")
    assert "could not be fetched" in body["error_description"]
    assert took < 3.5, f"the exchange waited {took:.1f} s on a 1 s deadline"


def test_an_issuer_trickling_its_introspection_answer_is_cut_off_at_the_deadline(app_with, ehr):
    http = app_with(TOKEN_EXCHANGE_HTTP_TIMEOUT="1")
    assert exchange_on(http, ehr).status_code == 200  # keys cached: only introspection is slow
    ehr.opaque["opaque-slow"] = {"active": True, "sub": "user-1", "client_id": UPSTREAM, "scope": "patient/*.rs",
                                 "pad": "x" * 1000}
    ehr.replies["introspect"] = Scripted(trickle=0.02)
    r, took = timed(lambda: exchange_on(http, ehr, subject_token="opaque-slow"))
    error_of(r, 400, "invalid_request")
    assert took < 3.5, f"the exchange waited {took:.1f} s on a 1 s deadline"


def test_a_vendor_trickling_its_jwks_is_cut_off_at_the_deadline(app_with, world, ehr):
    vendor = FakeEHR("vendor-keys", alg="ES384")
    try:
        world("client", "add", "backend", "--jwks-uri", vendor.issuer + "/jwks")
        world("trust", "add", "--client", "backend", "--issuer", ehr.issuer, "--target", TARGET,
              "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
        http = app_with(TOKEN_EXCHANGE_HTTP_TIMEOUT="1")
        vendor.replies["jwks"] = Scripted(trickle=0.02)
        now = int(time.time())
        a = vendor.sign({"iss": "backend", "sub": "backend", "aud": SERVICE + "/token", "exp": now + 200,
                         "jti": uuid.uuid4().hex})
        r, took = timed(lambda: exchange_on(http, ehr, auth=None, client_assertion_type=ASSERTION,
                                            client_assertion=a))
        error_of(r, 401, "invalid_client")
        assert took < 3.5, f"client authentication waited {took:.1f} s on a 1 s deadline"
    finally:
        vendor.stop()


def test_discovery_trickling_its_document_is_cut_off_at_the_deadline(cli, env, ehr):
    from conftest import CLI
    from fakes import SOURCE
    ehr.replies[".well-known/openid-configuration"] = Scripted(trickle=0.02)
    slow = CLI(dict(env, TOKEN_EXCHANGE_HTTP_TIMEOUT="1"))
    r, took = timed(lambda: slow("issuer", "add", ehr.issuer, "--discover", "--source", SOURCE, check=False))
    assert r.exit_code != 0
    assert took < 6, f"discovery waited {took:.1f} s on a 1 s deadline per document"


def test_one_deadline_bounds_several_calls(ehr):
    from token_exchange.upstream import Deadline, Upstream, UpstreamError
    upstream = Upstream(SimpleNamespace(http_timeout=5))
    ehr.replies["jwks"] = Scripted(trickle=0.01)
    shared = Deadline(1.5)
    t = time.monotonic()
    outcomes = []
    for _ in range(3):
        try:
            upstream.get_json(ehr.issuer + "/jwks", deadline=shared)
            outcomes.append("answered")
        except UpstreamError as e:
            outcomes.append(e.reason)
    took = time.monotonic() - t
    assert took < 3, f"three calls under one 1.5 s deadline took {took:.1f} s"
    assert outcomes[0] == "deadline passed" and all(o.startswith("deadline") for o in outcomes), outcomes


# -- size, cookies, redirects ---------------------------------------------------------------
def test_an_answer_over_the_size_cap_is_refused(app_with, ehr):
    http = app_with()
    doc = ehr.jwks()
    doc["padding"] = "x" * (1024 * 1024 + 10)
    ehr.replies["jwks"] = Scripted(body=json.dumps(doc).encode())
    error_of(exchange_on(http, ehr), 400, "invalid_request")
    ehr.replies["jwks"] = Scripted(body=json.dumps(doc).encode(), content_length=None)
    from token_exchange.upstream import Upstream, UpstreamError
    with pytest.raises(UpstreamError) as e:
        Upstream(SimpleNamespace(http_timeout=5)).get_json(ehr.issuer + "/jwks")
    assert "larger than" in e.value.reason
    ehr.replies["jwks"] = Scripted(body=b"{}" + b" " * 2000)
    with pytest.raises(UpstreamError):
        Upstream(SimpleNamespace(http_timeout=5)).get_json(ehr.issuer + "/jwks", max_bytes=1000)


def test_cookies_an_upstream_sets_are_never_kept_nor_sent_back(app_with, ehr):
    http = app_with(TOKEN_EXCHANGE_JWKS_MIN_REFETCH="0")
    cookies = tuple(("Set-Cookie", f"c{i}={'v' * 2000}; Path=/") for i in range(20))
    ehr.replies["jwks"] = Scripted(headers=cookies)
    assert exchange_on(http, ehr).status_code == 200
    forged = ehr.sign(ehr.access_claims(), key=new_key(), headers={"kid": "rotated"})  # forces a refetch
    error_of(exchange_on(http, ehr, subject_token=forged), 400, "invalid_request")
    fetches = [headers for endpoint, headers, _ in ehr.requests_seen if endpoint == "jwks"]
    assert len(fetches) >= 2
    assert not any("Cookie" in h or "cookie" in h for h in fetches), [h.get("Cookie", "")[:40] for h in fetches]
    upstream = http.application.extensions["token_exchange"].jwks_cache.upstream
    assert len(upstream.session.cookies) == 0


def test_redirects_are_not_followed(app_with, ehr):
    http = app_with()
    ehr.replies["jwks"] = Scripted(status=302, headers=(("Location", f"/{ehr.name}/moved-keys"),), body=b"")
    ehr.replies["moved-keys"] = Scripted(body=json.dumps(ehr.jwks()).encode())
    error_of(exchange_on(http, ehr), 400, "invalid_request")
    assert ehr.hits["moved-keys"] == 0


# -- bounded JSON, typed errors, logs ---------------------------------------------------------
@pytest.mark.parametrize("body, reason", [
    (b"[" * 5000 + b"]" * 5000, "not JSON"), (b"[" * 40 + b"]" * 40, "not JSON"), (b"NaN", "not JSON"),
    (b"1" * 5000, "not JSON"), (b"\xff\xfe", "not JSON"),
])
def test_json_is_decoded_bounded_and_errors_are_typed(ehr, body, reason):
    from token_exchange.upstream import Upstream, UpstreamError
    ehr.replies["jwks"] = Scripted(body=body)
    with pytest.raises(UpstreamError) as e:
        Upstream(SimpleNamespace(http_timeout=5)).get_json(ehr.issuer + "/jwks")
    assert reason in e.value.reason and e.value.status == 200


def test_a_non_2xx_answer_is_returned_with_its_status_and_no_body(ehr):
    from token_exchange.upstream import Upstream
    ehr.replies["jwks"] = Scripted(status=503, body=b"[" * 5000)
    r = Upstream(SimpleNamespace(http_timeout=5)).get_json(ehr.issuer + "/jwks")
    assert (r.status, r.json) == (503, None)


def test_post_form_sends_the_form_and_credentials(ehr):
    from token_exchange.upstream import Upstream
    ehr.opaque["t-1"] = {"active": True}
    r = Upstream(SimpleNamespace(http_timeout=5)).post_form(ehr.issuer + "/introspect", {"token": "t-1"},
                                                            auth=("te", "pw"))
    assert r.status == 200 and r.json == {"active": True}
    endpoint, headers, form = ehr.requests_seen[-1]
    assert endpoint == "introspect" and form == {"token": ["t-1"]} and headers["Authorization"].startswith("Basic ")


@pytest.mark.parametrize("url, shown", [
    ("https://user:pw@ehr.example/jwks?key=abc", "https://ehr.example/jwks?…"),
    ("https://ehr.example:8443/a/b", "https://ehr.example:8443/a/b"),
    ("http://:pw@h/x", "http://h/x"),
])
def test_urls_are_redacted_for_logs(url, shown):
    from token_exchange.upstream import redact
    assert redact(url) == shown
