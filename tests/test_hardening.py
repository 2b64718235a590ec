"""Issue 16, "Hardening II": one request never costs seconds, memory or a worker;
hostile upstreams never cause a 500. Each test is named after the bound or rule
it checks and measures the bound itself (CPU seconds, response bytes, RSS growth,
upstream hits, latency beside an attack), with margins for a loaded 2-core machine."""
from __future__ import annotations

import base64
import gc
import json
import os
import time
import uuid

import jwt
import pytest

from conftest import AT, IDT, OTHER_SECRET, SERVICE, TE, VENDOR_SECRET, audit_rows, post_token
from fakes import SOURCE, TARGET, UPSTREAM, FakeEHR, Scripted, nested_json, new_key
from test_private_key_jwt import ASSERTION, VendorKeys
from test_token import error_of

SOURCE2 = "https://fhir.a2.example/fhir"
DEEP = 3000  # levels of nesting: past Python's recursion limit (1,000)


@pytest.fixture(autouse=True)
def _hostile_reset(ehr):
    yield
    ehr.reset_hostile()


@pytest.fixture
def make_app(env, world):
    """create_app with extra settings; every app made is closed at the end."""
    from token_exchange import create_app
    made = []

    def make(**settings):
        app = create_app(env=dict(env, **settings))
        made.append(app)
        return app
    yield make
    for app in made:
        app.extensions["token_exchange"].store.close()
        app.extensions["token_exchange"].engine.dispose()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_jws(header: bytes, payload: bytes, key, alg="RS256") -> str:
    """A compact JWS over exactly these bytes (jwt.encode cannot serialise deep nesting)."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    return signing_input + "." + b64(jwt.get_algorithm_by_name(alg).sign(signing_input.encode(), key))


def nested_claims(claims: dict, depth: int = DEEP) -> bytes:
    """claims as JSON, plus a claim nested `depth` arrays deep."""
    return json.dumps(claims).encode()[:-1] + b', "nested": ' + b"[" * depth + b"]" * depth + b"}"


def cpu_of(fn):
    """(result, CPU seconds this process spent on fn, all threads)."""
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def types(n):
    """n distinct FHIR-shaped resource type names."""
    return [f"Type{chr(65 + i // 26)}{chr(97 + i % 26)}" for i in range(n)]


# -- 1. scope algebra: bounded, near-linear, no cache an attacker can fill -----------------
def test_a_wide_request_against_a_token_listing_many_types_is_refused_in_bounded_cpu(exchange, ehr):
    """60 typed v1 scopes in the token x 100 ?param wildcards asked: the pairwise algebra
    took ~10 s and granted 6,000 scopes; now the work stops at the budget."""
    token_scope = " ".join(f"patient/{t}.read" for t in types(60)) + " openid"
    asked = " ".join(f"patient/*.rs?category=c{i}" for i in range(100))
    r, cpu = cpu_of(lambda: exchange(subject_token=ehr.access_token(scope=token_scope), scope=asked))
    body = error_of(r, 400, "invalid_scope")
    assert "fewer" in body["error_description"]
    assert cpu < 1.0, f"{cpu:.2f} s of CPU for one request"
    assert len(r.get_data()) < 2048


def test_a_wide_request_against_a_trust_naming_many_types_is_refused_in_bounded_cpu(world, http, ehr):
    world("trust", "add", "--client", "other", "--issuer", ehr.issuer, "--target", TARGET, "--scopes",
          " ".join(f"patient/{t}.rs" for t in types(40)), "--upstream-client-id", UPSTREAM)
    asked = " ".join(f"patient/*.rs?category=c{i}" for i in range(100))
    data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
            "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET, "scope": asked}
    r, cpu = cpu_of(lambda: post_token(http, data, auth=("other", OTHER_SECRET)))
    error_of(r, 400, "invalid_scope")
    assert cpu < 1.0, f"{cpu:.2f} s of CPU for one request"


def test_a_grant_lists_at_most_100_scopes_and_beyond_says_ask_for_fewer(exchange, ehr):
    token_scope = " ".join(f"patient/{t}.rs" for t in types(60))
    # 2 wildcards asked x 60 typed scopes held = 120 scopes: over the grant budget
    body = error_of(exchange(subject_token=ehr.access_token(scope=token_scope),
                             scope="patient/*.rs?category=a patient/*.rs?category=b"), 400, "invalid_scope")
    assert "fewer" in body["error_description"]
    # exactly 100 is granted
    asked = " ".join(f"patient/Observation.rs?category=c{i}" for i in range(100))
    r = exchange(scope=asked)
    assert r.status_code == 200, r.get_json()
    assert len(r.get_json()["scope"].split()) == 100


def test_a_request_scope_over_the_text_budget_is_invalid_scope(exchange):
    asked = " ".join(f"patient/Observation.rs?code={'x' * 400}{i}" for i in range(45))  # ~18 KB, 45 scopes
    body = error_of(exchange(scope=asked), 400, "invalid_scope")
    assert "longer than" in body["error_description"]


def test_a_subject_token_scope_claim_over_the_budget_is_invalid_request(exchange, ehr):
    claim = " ".join(f"patient/{t}.r" for t in types(300))
    body = error_of(exchange(subject_token=ehr.access_token(scope=claim)), 400, "invalid_request")
    assert "fewer scopes" in body["error_description"]
    listed = ehr.access_token(scope=None, scp=claim.split())
    error_of(exchange(subject_token=listed), 400, "invalid_request")


def test_a_jwt_grant_whose_scope_claim_is_over_the_budget_is_invalid_grant(world, http, ehr):
    from test_jwt_grant import JWT_BEARER, make_grant
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--allow-jwt-grant")
    assertion = make_grant(ehr, scope=" ".join(f"patient/{t}.r" for t in types(300)))
    body = error_of(post_token(http, {"grant_type": JWT_BEARER, "assertion": assertion, "resource": TARGET}),
                    400, "invalid_grant")
    assert "fewer scopes" in body["error_description"]


def test_refused_requests_with_distinct_scope_strings_do_not_grow_memory(world, http, ehr):
    """A client without any trust sends ~12 KB scope strings, each new: the old
    lru_caches kept every one (~700 MB per worker for 4,096 of 63 KB)."""
    subject, actor = ehr.access_token(), ehr.id_token()

    def send(i):
        asked = " ".join(f"patient/Observation.rs?code=r{i}-{j:03d}-{'x' * 90}" for j in range(100))
        r = post_token(http, {"grant_type": TE, "subject_token": subject, "subject_token_type": AT,
                              "actor_token": actor, "actor_token_type": IDT, "resource": TARGET,
                              "scope": asked}, auth=("other", OTHER_SECRET))
        assert r.status_code == 400 and r.get_json()["error"] == "unauthorized_client", r.get_json()
    for i in range(50):
        send(i)  # warm up the allocator, Flask, the config snapshot
    gc.collect()
    before = rss_mb()
    for i in range(50, 1550):
        send(i)
    gc.collect()
    grown = rss_mb() - before
    assert grown < 25, f"RSS grew {grown:.0f} MB over 1,500 refused requests"


# -- 2. trusts before tokens: no key fetched for an issuer the client is not trusted for ---
def test_tokens_from_an_issuer_the_client_has_no_trust_for_fetch_no_keys(world, exchange, ehr_b):
    world("issuer", "add", ehr_b.issuer, "--jwks-uri", ehr_b.issuer + "/jwks", "--source", SOURCE2,
          "--algs", "ES256")
    hits = ehr_b.jwks_hits
    for _ in range(3):
        body = error_of(exchange(subject_token=ehr_b.access_token(aud=SOURCE2),
                                 actor_token=ehr_b.id_token(source=SOURCE2)), 400, "invalid_request")
        assert "not trusted" in body["error_description"] and "issuer" in body["error_description"]
    assert ehr_b.jwks_hits == hits


def test_an_unknown_target_is_refused_before_any_key_is_fetched(world, exchange, ehr):
    hits = ehr.jwks_hits
    error_of(exchange(resource="https://unknown.example/fhir"), 400, "invalid_target")
    assert ehr.jwks_hits == hits


# -- 4, 5. outbound fetches an anonymous caller can cause: none for junk, one per interval --
@pytest.fixture
def vendor(world, ehr):
    """A vendor host serving a private_key_jwt client's JWKS; client 'backend' uses it."""
    host = FakeEHR("vendor-keys", alg="ES384")
    world("client", "add", "backend", "--jwks-uri", host.issuer + "/jwks")
    world("trust", "add", "--client", "backend", "--issuer", ehr.issuer, "--target", TARGET,
          "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
    yield host
    host.stop()


def vendor_assertion(host, key=None, **over):
    now = int(time.time())
    claims = {"iss": "backend", "sub": "backend", "aud": SERVICE + "/token", "exp": now + 200,
              "iat": now, "jti": uuid.uuid4().hex}
    claims.update(over)
    return host.sign({k: v for k, v in claims.items() if v is not None}, key=key)


def assertion_form(ehr, assertion):
    return {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
            "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET,
            "client_assertion_type": ASSERTION, "client_assertion": assertion}


def test_junk_assertions_never_fetch_the_clients_jwks(http, ehr, vendor):
    now = int(time.time())
    junk = [
        "x.y.z", "a" * 50, vendor_assertion(vendor, aud="https://elsewhere.example/token"),
        vendor_assertion(vendor, exp=now - 3600), vendor_assertion(vendor, exp=now + 3600),
        vendor_assertion(vendor, exp=None), vendor_assertion(vendor, iss="someone-else"),
        vendor_assertion(vendor, sub="nobody", iss="nobody"), vendor_assertion(vendor, sub="vendor", iss="vendor"),
        vendor_assertion(vendor, exp="soon"), vendor_assertion(vendor, aud=None),
        jwt.encode({"iss": "backend", "sub": "backend", "aud": SERVICE + "/token", "exp": now + 60},
                   "k" * 32, algorithm="HS256"),
    ]
    for a in junk:
        error_of(post_token(http, assertion_form(ehr, a), auth=None), 401, "invalid_client")
    assert vendor.hits["jwks"] == 0


def test_a_failing_client_jwks_is_fetched_at_most_once_per_interval(http, ehr, vendor):
    vendor.down = True
    for _ in range(20):  # well-formed, well-addressed, unexpired: only the keys are missing
        error_of(post_token(http, assertion_form(ehr, vendor_assertion(vendor)), auth=None), 401, "invalid_client")
    assert vendor.hits["jwks"] <= 1
    vendor.down = False


def test_a_failing_issuer_jwks_never_cached_is_fetched_at_most_once_per_interval(exchange, ehr):
    ehr.down = True
    hits = ehr.jwks_hits
    for _ in range(15):
        error_of(exchange(), 400, "invalid_request")
    assert ehr.jwks_hits - hits <= 1


def test_a_client_jwks_answering_no_store_is_still_fetched_at_most_once_per_interval(http, ehr, vendor):
    vendor.replies["jwks"] = Scripted(headers=(("Cache-Control", "no-store"),))
    for _ in range(5):
        r = post_token(http, assertion_form(ehr, vendor_assertion(vendor)), auth=None)
        assert r.status_code == 200, r.get_json()
    assert vendor.hits["jwks"] == 1


def test_a_slow_refresh_holds_no_request_that_has_cached_keys(app, exchange_factory, ehr):
    """Expired keys are refreshed by one request; the others go on with the cached keys
    instead of queueing behind the fetch."""
    import threading
    assert exchange_factory(app.test_client()).status_code == 200
    entry = next(iter(app.extensions["token_exchange"].jwks_cache._entries.values()))
    entry.expires = entry.last_attempt = 0.0  # expired, and a refetch is due
    ehr.hang = 3
    hits = ehr.jwks_hits
    refreshing = threading.Thread(target=exchange_factory, args=(app.test_client(),))
    refreshing.start()
    end = time.monotonic() + 10
    while ehr.jwks_hits == hits and time.monotonic() < end:
        time.sleep(0.01)  # until the refresh has reached the (hanging) EHR
    t = time.monotonic()
    r = exchange_factory(app.test_client())
    took = time.monotonic() - t
    refreshing.join(30)
    assert r.status_code == 200 and took < 1.5, took


# -- 6. no 500 from any input or upstream answer ---------------------------------------------
def test_a_client_assertion_nested_thousands_deep_is_invalid_client(http, ehr, vendor):
    now = int(time.time())
    payload = nested_claims({"iss": "backend", "sub": "backend", "aud": SERVICE + "/token", "exp": now + 60})
    for header, body in ((b'{"alg":"ES384","kid":"vendor-keys-k1"}', payload),
                         (b'{"alg":"ES384","x":' + b"[" * DEEP + b"]" * DEEP + b"}", payload)):
        a = f"{b64(header)}.{b64(body)}.{b64(b'sig')}"
        error_of(post_token(http, assertion_form(ehr, a), auth=None), 401, "invalid_client")
    assert vendor.hits["jwks"] == 0


@pytest.mark.parametrize("slot", ["subject_token", "actor_token"])
def test_a_token_nested_thousands_deep_is_invalid_request_and_audited(world, exchange, ehr, slot):
    claims = ehr.access_claims() if slot == "subject_token" else ehr.id_claims()
    header = json.dumps({"alg": "RS256", "kid": ehr.kid, "typ": "JWT"}).encode()
    token = raw_jws(header, nested_claims(claims), ehr.key)
    assert len(token) < 16 * 1024
    error_of(exchange(**{slot: token}), 400, "invalid_request")
    row = audit_rows(world)[-1]
    assert (row["client_id"], row["outcome"], row["error"]) == ("vendor", "refused", "invalid_request")


def test_huge_numbers_in_a_token_are_invalid_request(exchange, ehr):
    header = json.dumps({"alg": "RS256", "kid": ehr.kid}).encode()
    claims = json.dumps(ehr.access_claims(exp=0)).replace('"exp": 0', '"exp": 1' + "0" * 5000).encode()
    error_of(exchange(subject_token=raw_jws(header, claims, ehr.key)), 400, "invalid_request")


@pytest.mark.parametrize("answer", [
    Scripted(body=nested_json(DEEP)),
    Scripted(body=nested_json(100)),
    Scripted(body=b"[1, 2, 3]"),
    Scripted(body=b'{"keys": {"kty": "RSA"}}'),
    Scripted(body=b'{"keys": [{"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA"}, {"kty": "XYZ"}, '
                  b'{"kty": "RSA", "n": 5, "e": []}, {"alg": ["RS256"], "kty": "RSA"}, 7]}'),
    Scripted(body=b"not json"),
    Scripted(body=b'{"keys": [], "n": 1' + b"0" * 5000 + b"}"),
    Scripted(status=302, headers=(("Location", "/ehr-a/jwks2"),), body=b""),
])
def test_a_hostile_issuer_jwks_is_invalid_request_never_500(exchange, ehr, answer):
    ehr.replies["jwks"] = answer
    error_of(exchange(), 400, "invalid_request")


def test_unusable_keys_beside_a_good_one_are_skipped(exchange, ehr):
    good = ehr.jwks()["keys"]
    odd = [{"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA", "kid": "odd"}, {"kty": "XYZ"},
           {"kty": "RSA", "alg": ["RS256"], "n": "AQAB", "e": "AQAB"}, {"kid": 5, "kty": "RSA"},
           dict(good[0], use="enc", kid="enc-key")]
    ehr.replies["jwks"] = Scripted(body=json.dumps({"keys": odd + good}).encode())
    assert exchange().status_code == 200


@pytest.mark.parametrize("answer", [
    Scripted(body=nested_json(DEEP)),
    Scripted(headers=(("Cache-Control", "max-age=" + "9" * 5000),)),
    Scripted(body=b'{"keys": [{"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA", "kid": "vendor-keys-k1"}]}'),
    Scripted(body=b'{"keys": [{"kty": "unknown", "kid": "vendor-keys-k1"}]}'),
    Scripted(body=b'["keys"]'),
])
def test_a_hostile_client_jwks_is_never_500(http, ehr, vendor, answer):
    vendor.replies["jwks"] = answer
    r = post_token(http, assertion_form(ehr, vendor_assertion(vendor)), auth=None)
    assert r.status_code in (200, 401), r.get_data(as_text=True)
    if r.status_code == 401:
        error_of(r, 401, "invalid_client")


def test_a_client_jwks_with_a_5000_digit_max_age_still_authenticates(http, ehr, vendor):
    vendor.replies["jwks"] = Scripted(headers=(("Cache-Control", "max-age=" + "9" * 5000),))
    r = post_token(http, assertion_form(ehr, vendor_assertion(vendor)), auth=None)
    assert r.status_code == 200, r.get_json()


@pytest.mark.parametrize("answer", [
    Scripted(body=nested_json(DEEP)), Scripted(body=b'["active", true]'), Scripted(body=b"null"),
    Scripted(body=b'{"active": true, "exp": 1' + b"0" * 5000 + b"}"),
    Scripted(body=b'{"active": true, "exp": 1e999, "sub": "user-1"}'),
    Scripted(status=500, body=b"oops"),
])
def test_a_hostile_introspection_answer_is_invalid_request_never_500(exchange, ehr, answer):
    ehr.replies["introspect"] = answer
    error_of(exchange(subject_token="opaque-hostile"), 400, "invalid_request")


@pytest.mark.parametrize("path", ["/introspect", "/revoke"])
def test_a_nested_token_at_introspect_and_revoke_is_never_500(http, path):
    from conftest import TARGET_SECRET
    from test_lifecycle import basic
    deep_header = b'{"alg":"RS256","x":' + b"[" * DEEP + b"]" * DEEP + b"}"
    plain_header, sig = b'{"alg":"RS256"}', b"s"
    for token in (".".join([b64(deep_header), b64(b"{}"), b64(sig)]),
                  ".".join([b64(plain_header), b64(nested_claims({})), b64(sig)])):
        auth = basic("hospital-b", TARGET_SECRET) if path == "/introspect" else basic("vendor", VENDOR_SECRET)
        r = http.post(path, data={"token": token}, headers=auth)
        assert r.status_code == 200, r.get_data(as_text=True)


# -- 7. subject and actor from one source -----------------------------------------------------
@pytest.fixture
def two_sources(world, ehr_b):
    """ehr_b vouches for SOURCE and SOURCE2; the same patient id has a link from each."""
    world("issuer", "add", ehr_b.issuer, "--jwks-uri", ehr_b.issuer + "/jwks", "--source", SOURCE,
          "--source", SOURCE2, "--algs", "ES256")
    world("trust", "add", "--client", "vendor", "--issuer", ehr_b.issuer, "--target", TARGET,
          "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
    world("link", "add", "--source", SOURCE2, "--patient", "a-123", "--target", TARGET, "--target-patient", "b-999")
    return ehr_b


def test_access_and_id_token_naming_different_sources_is_invalid_request(exchange, two_sources):
    b = two_sources
    body = error_of(exchange(subject_token=b.access_token(patient="a-123", source=SOURCE),
                             actor_token=b.id_token(patient="a-123", source=SOURCE2)), 400, "invalid_request")
    assert "source" in body["error_description"]


def test_access_and_id_token_naming_the_same_source_are_granted(exchange, two_sources):
    b = two_sources
    r = exchange(subject_token=b.access_token(patient="a-123", source=SOURCE2),
                 actor_token=b.id_token(patient="a-123", source=SOURCE2))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["patient"] == "b-999"


# -- 8. introspected subject tokens are access tokens -----------------------------------------
def opaque_answer(ehr, **over):
    now = int(time.time())
    body = {"active": True, "iss": ehr.issuer, "sub": "user-1", "client_id": UPSTREAM, "scope": "patient/*.rs",
            "aud": SOURCE, "exp": now + 300, "iat": now}
    body.update(over)
    return {k: v for k, v in body.items() if v is not None}


def test_introspection_is_sent_the_access_token_hint(exchange, ehr):
    ehr.opaque["opaque-hint"] = opaque_answer(ehr)
    assert exchange(subject_token="opaque-hint").status_code == 200
    forms = [form for endpoint, _, form in ehr.requests_seen if endpoint == "introspect"]
    assert forms[-1]["token_type_hint"] == ["access_token"]


@pytest.mark.parametrize("token_type", ["refresh_token", "urn:ietf:params:oauth:token-type:refresh_token",
                                        "id_token", "", 5, ["access_token"]])
def test_an_introspected_token_of_another_type_is_invalid_request(exchange, ehr, token_type):
    ehr.opaque["opaque-type"] = opaque_answer(ehr, token_type=token_type)
    body = error_of(exchange(subject_token="opaque-type"), 400, "invalid_request")
    assert "access token" in body["error_description"]


@pytest.mark.parametrize("token_type", [None, "access_token", "Bearer", "bearer", "ACCESS_TOKEN",
                                        "urn:ietf:params:oauth:token-type:access_token"])
def test_an_introspected_access_token_is_accepted(exchange, ehr, token_type):
    ehr.opaque["opaque-ok"] = opaque_answer(ehr, token_type=token_type)
    r = exchange(subject_token="opaque-ok")
    assert r.status_code == 200, r.get_json()


# -- 9. revocation is idempotent under concurrency ---------------------------------------------
def test_concurrent_revocations_of_one_token_all_answer_200(app, exchange):
    """RFC 7009 §2.2: revoking is idempotent. Check-then-insert let two revocations of one
    token collide on PostgreSQL's unique key, and one answered 503."""
    import threading

    from test_lifecycle import basic, introspect
    n, statuses = 16, []
    for _ in range(6):  # rounds: each a new token, revoked by n threads at once
        token = exchange().get_json()["access_token"]
        barrier = threading.Barrier(n)

        def revoke():
            http = app.test_client()
            barrier.wait()
            r = http.post("/revoke", data={"token": token}, headers=basic("vendor", VENDOR_SECRET))
            statuses.append(r.status_code)
        threads = [threading.Thread(target=revoke) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert introspect(app.test_client(), token).get_json() == {"active": False}
    assert statuses == [200] * n * 6, sorted(set(statuses))


def test_threads_of_one_worker_all_commit_their_audit_records(app, world, ehr):
    """gthread serves requests on threads of one process: each thread keeps its own
    hot-path connection and (SQLite) its own flock file description, so writers of
    one process still queue on the writer lock and every decision is recorded."""
    import threading
    before = len(audit_rows(world, "--outcome", "granted"))
    statuses, lock = [], threading.Lock()

    def work():
        http = app.test_client()
        for _ in range(8):
            r = post_token(http, {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
                                  "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET})
            with lock:
                statuses.append(r.status_code)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * 64
    assert len(audit_rows(world, "--outcome", "granted")) - before == 64
    app.extensions["token_exchange"].store.close()


# -- 11. private files; URLs logged without credentials ----------------------------------------
def test_the_sqlite_database_its_sidecars_and_folder_are_private(tmp_path, ehr):
    import stat

    from conftest import CLI, base_env, build_world
    from token_exchange import create_app
    folder = tmp_path / "instance"
    folder.mkdir(mode=0o700)  # a given URL's folder must exist (the default instance folder is made 0700)
    env = base_env(f"sqlite:///{folder}/te.db")
    cli = CLI(env)
    cli("db", "upgrade")
    build_world(cli, ehr)
    app = create_app(env=env)
    data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
            "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET}
    assert post_token(app.test_client(), data).status_code == 200
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    try:
        assert mode(folder) == 0o700
        for name in ("te.db", "te.db-wal", "te.db-shm", "te.db-writer.lock"):
            assert (folder / name).exists(), name
            assert mode(folder / name) == 0o600, (name, oct(mode(folder / name)))
    finally:
        app.extensions["token_exchange"].store.close()
        app.extensions["token_exchange"].engine.dispose()


def test_an_existing_world_readable_database_is_made_private(tmp_path):
    import stat

    from token_exchange.db import make_engine
    path = tmp_path / "te.db"
    path.write_bytes(b"")
    path.chmod(0o644)
    make_engine(f"sqlite:///{path}").dispose()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_urls_are_logged_without_their_credentials(make_app, world, exchange_factory, ehr, ehr_b, caplog):
    import logging
    with_creds = "http://user:s3cret-pw@127.0.0.1:9/keys?api_key=s3cret-q"
    world("issuer", "add", ehr_b.issuer, "--jwks-uri", with_creds, "--source", SOURCE2, "--algs", "ES256")
    world("trust", "add", "--client", "vendor", "--issuer", ehr_b.issuer, "--target", TARGET,
          "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
    world("client", "add", "creds", "--jwks-uri", with_creds)
    http = make_app().test_client()
    service_log = logging.getLogger("token_exchange")  # it does not propagate to the root logger
    service_log.addHandler(caplog.handler)
    try:
        error_of(exchange_factory(http, subject_token=ehr_b.access_token(aud=SOURCE2),
                                  actor_token=ehr_b.id_token(source=SOURCE2)), 400, "invalid_request")
        now = int(time.time())
        a = jwt.encode({"iss": "creds", "sub": "creds", "aud": SERVICE + "/token", "exp": now + 60, "jti": "j"},
                       new_key("ES384"), algorithm="ES384")
        error_of(post_token(http, assertion_form(ehr, a), auth=None), 401, "invalid_client")
    finally:
        service_log.removeHandler(caplog.handler)
    logged = [f"{r.getMessage()} {r.__dict__}" for r in caplog.records]
    assert sum("127.0.0.1:9/keys" in line for line in logged) >= 2  # both failures were logged...
    assert not any("s3cret" in line for line in logged)  # ...without the credentials


# -- 12. malformed database URLs: one line naming the setting, never the password ---------------
@pytest.mark.parametrize("url, says", [
    ("postgresql://te:pw-s3cret@db.example:notaport/te", "port"),
    ("mysql://te:pw-s3cret@db.example/te", "PostgreSQL and SQLite"),
    ("notaurl", "not a database URL"),
    ("postgresql+pg8000://te:pw-s3cret@db.example/te", "driver"),
    ("sqlite:///{file}/below/te.db", "directory"),
    ("", "not a database URL"),
])
def test_a_malformed_database_url_is_one_settings_error_line(tmp_path, url, says):
    from token_exchange.db import make_engine
    from token_exchange.settings import SettingsError
    regular = tmp_path / "a-file"
    regular.write_text("x")
    with pytest.raises(SettingsError) as e:
        make_engine(url.format(file=regular))
    msg = str(e.value)
    assert "\n" not in msg and "TOKEN_EXCHANGE_DATABASE_URL" in msg and says in msg, msg
    assert "pw-s3cret" not in msg


# -- 10. slow clients cannot hold workers: a real `token-exchange serve` --------------------------
class Served:
    """`token-exchange serve` in its own process group, on the test's database."""

    def __init__(self, env, tmp, workers=1, **settings):
        import subprocess
        import sys
        from pathlib import Path

        import requests

        from fakes import free_port
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"serve-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in env.items() if k != "TOKEN_EXCHANGE_RELOAD_INTERVAL"}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "token-exchange"), "serve", "--port", str(self.port),
             "--workers", str(workers)], env=dict(os.environ, **env, **settings), stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                if requests.get(self.base + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, "serve exited at start"
            time.sleep(0.1)
        raise AssertionError("serve did not become ready")

    def stop(self):
        import signal
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def serve(env, world, tmp_path):
    started = []

    def start(**kw):
        s = Served(env, tmp_path, **kw)
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop()


def _timed(fn):
    t = time.monotonic()
    out = fn()
    return out, time.monotonic() - t


def legit_exchange(base, ehr):
    import requests
    data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
            "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET}
    return requests.post(base + "/token", data=data, auth=("vendor", VENDOR_SECRET), timeout=60)


def test_slow_request_bodies_cannot_hold_the_workers(serve, ehr):
    """More clients than threads trickle a declared 1,000-byte body one byte at a time
    for 10 s (five read deadlines); a legitimate exchange beside them is answered
    promptly, and each trickling connection is cut at the read deadline."""
    import socket
    import threading
    srv = serve(workers=1, TOKEN_EXCHANGE_WORKER_THREADS="4", TOKEN_EXCHANGE_REQUEST_READ_TIMEOUT="2")
    assert legit_exchange(srv.base, ehr).status_code == 200  # warm: keys cached
    stop, held = threading.Event(), []
    head = (f"POST /token HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n").encode()

    def trickle():
        while not stop.is_set():
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
                    s.sendall(head)
                    while not stop.is_set():
                        s.sendall(b"a")
                        if stop.wait(0.25):
                            break
            except OSError:
                pass  # cut by the server
            held.append(time.monotonic() - started)
    attackers = [threading.Thread(target=trickle, daemon=True) for _ in range(8)]
    for t in attackers:
        t.start()
    latencies = []
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            r, took = _timed(lambda: legit_exchange(srv.base, ehr))
            assert r.status_code == 200, r.text
            latencies.append(took)
            time.sleep(0.5)
    finally:
        stop.set()
        for t in attackers:
            t.join(10)
    assert max(latencies) < 5, f"legitimate exchanges took up to {max(latencies):.1f} s beside the attack"
    assert len(held) > 8 * 3, "the trickling connections were not cut"
    assert sorted(held)[len(held) // 2] < 5, f"median trickling connection held {sorted(held)[len(held) // 2]:.1f} s"


def test_jwks_and_discovery_answer_while_exchanges_wait_on_a_slow_upstream(serve, ehr):
    import threading

    import requests
    srv = serve(workers=1)
    ehr.hang = 3  # the EHR answers its JWKS only after 3 s
    waiting = [threading.Thread(target=legit_exchange, args=(srv.base, ehr), daemon=True) for _ in range(2)]
    for t in waiting:
        t.start()
    time.sleep(0.5)  # the exchanges are now waiting on the EHR
    for path in ("/jwks", "/.well-known/smart-configuration", "/.well-known/oauth-authorization-server"):
        r, took = _timed(lambda: requests.get(srv.base + path, timeout=30))
        assert r.status_code == 200 and took < 1.5, (path, r.status_code, took)
    for t in waiting:
        t.join(30)


def test_idle_connections_do_not_hold_threads(serve, ehr):
    import socket

    import requests
    srv = serve(workers=1, TOKEN_EXCHANGE_WORKER_THREADS="2")
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(12)]  # never send a byte
    kept = requests.Session()
    for _ in range(4):  # kept-alive connections, idle after their request
        assert kept.get(srv.base + "/healthz", timeout=10).status_code == 200
    try:
        for path in ("/jwks", "/healthz"):
            r, took = _timed(lambda: requests.get(srv.base + path, timeout=30))
            assert r.status_code == 200 and took < 1.5, (path, took)
        r, took = _timed(lambda: legit_exchange(srv.base, ehr))
        assert r.status_code == 200 and took < 3, took
    finally:
        for s in idle:
            s.close()
        kept.close()


def test_a_nul_in_what_a_record_keeps_is_stored_as_a_replacement_character_never_cut_short(world, exchange, ehr):
    """PostgreSQL's text cannot hold NUL: the record keeps U+FFFD in its place, on every back
    end, so what follows the NUL is still on record and the request is answered for what it is."""
    sub = "alice\x00evil"
    r = exchange(subject_token=ehr.access_token(sub=sub), actor_token=ehr.id_token(sub=sub, patient="p-unlinked"))
    error_of(r, 400, "invalid_scope")  # the patient is not linked: refused, and recorded
    row = audit_rows(world)[-1]
    assert row["subject"] == "alice\ufffdevil"
