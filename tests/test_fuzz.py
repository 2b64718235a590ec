"""Property-based fuzz of POST /token: no input yields a 5xx, and no request
that is not fully valid yields a token."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import AT, IDT, JWT_T, TE, VENDOR_SECRET, post_token
from fakes import TARGET, TARGET2

settings.register_profile("ci", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("default", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

NAMES = ["grant_type", "subject_token", "subject_token_type", "actor_token", "actor_token_type", "resource",
         "audience", "scope", "requested_token_type", "client_id", "client_secret", "client_assertion",
         "client_assertion_type", "patient", "x"]
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
VALUES = st.one_of(text, st.sampled_from([TE, AT, IDT, JWT_T, TARGET, TARGET2, "hospital-b", "patient/*.rs",
                                          "patient/Observation.rs?x=y", "user/*.cruds", "openid",
                                          "urn:ietf:params:oauth:token-type:refresh_token", "a.b.c", ""]))


@given(pairs=st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=12),
       auth=st.sampled_from([None, ("vendor", VENDOR_SECRET), ("vendor", "x"), ("", ""), ("other", "y" * 40)]))
@settings(deadline=None)
def test_no_input_yields_5xx_or_a_token_without_valid_tokens(http, pairs, auth):
    # the subject and actor tokens here are never validly signed, so nothing may be minted
    r = post_token(http, [(k, v) for k, v in pairs], auth=auth)
    assert r.status_code < 500, r.get_data(as_text=True)
    body = r.get_json()
    assert "access_token" not in body and body["error"]


@given(mutation=st.sampled_from(["drop", "dup", "swap", "truncate", "flip"]), which=st.integers(0, 6),
       junk=text)
@settings(max_examples=200, deadline=None)
def test_mutated_valid_requests_never_5xx_and_mint_only_when_valid(http, ehr, mutation, which, junk):
    fields = [("grant_type", TE), ("subject_token", ehr.access_token()), ("subject_token_type", AT),
              ("actor_token", ehr.id_token()), ("actor_token_type", IDT), ("resource", TARGET),
              ("scope", "patient/Observation.rs")]
    i = which % len(fields)
    name, value = fields[i]
    if mutation == "drop":
        fields.pop(i)
    elif mutation == "dup":
        fields.append((name, value))
    elif mutation == "swap":
        fields[i] = (name, junk)
    elif mutation == "truncate":
        fields[i] = (name, value[: len(value) // 2])
    else:
        # flip a middle character (a JWT's last base64 character may carry only padding bits)
        mid = len(value) // 2
        fields[i] = (name, value[:mid] + ("A" if value[mid] != "A" else "B") + value[mid + 1:])
    r = post_token(http, fields)
    assert r.status_code < 500
    if r.status_code == 200:
        # only mutations that leave a fully valid request may succeed
        assert (mutation == "drop" and name in ("scope", "actor_token", "actor_token_type")) or \
               (mutation == "swap" and name == "scope") or (mutation == "flip" and name == "scope") or \
               (mutation == "truncate" and name == "scope") or \
               (mutation == "dup" and name == "resource"), (mutation, name, r.get_json())


# -- issue 16: nested JSON, huge numbers and control characters in tokens, client
# assertions and upstream documents. Whatever they carry: never a 5xx. -------------------
import base64  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import jwt  # noqa: E402

from fakes import SOURCE, UPSTREAM, Scripted  # noqa: E402

CONTROL = st.text(st.characters(min_codepoint=0, max_codepoint=0x9f), max_size=12)
HUGE_NUMBERS = st.sampled_from(["1" + "0" * 5000, "-" + "9" * 4400, "1e999", "-1e999", "1e-999", "0.1" + "1" * 400,
                                "123456789012345678901234567890", "-0", "1E400",
                                "1" + "0" * 400, "-" + "9" * 400])  # ints that parse but fit no float
# JSON text, written out so nesting past Python's recursion limit and numbers int()
# refuses can be expressed at all (json.dumps cannot produce them).
DEEP = st.sampled_from([50, 900, 1100, 3000]).flatmap(
    lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n + '"x"' + "]" * n]))
json_texts = st.recursive(
    st.one_of(st.just("null"), st.just("true"), HUGE_NUMBERS, st.integers().map(str),
              st.floats(allow_nan=False, allow_infinity=False).map(repr),
              CONTROL.map(json.dumps), text.map(json.dumps), DEEP),
    lambda inner: st.one_of(st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
                            st.lists(st.tuples(st.sampled_from(["scope", "aud", "patient", "source", "sub", "exp",
                                                                "may_act", "client_id", "x"]), inner), max_size=3)
                            .map(lambda kv: "{" + ",".join(f'"{k}":{v}' for k, v in kv) + "}")),
    max_leaves=6)
CLAIM_NAMES = st.sampled_from(["scope", "scp", "aud", "patient", "source", "sub", "exp", "nbf", "iat", "may_act",
                               "client_id", "azp", "fhirUser", "iss", "nonce", "x"])
FUZZ = settings(max_examples=600 if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else 120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: dict, payload: str, key, alg: str) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(payload.encode('utf-8', 'surrogatepass'))}"
    return signing_input + "." + _b64(jwt.get_algorithm_by_name(alg).sign(signing_input.encode(), key))


def _with_claim(claims: dict, name: str, value_text: str) -> str:
    """claims as JSON text with `name` set to the raw JSON text value_text."""
    claims = {k: v for k, v in claims.items() if k != name}
    return json.dumps(claims)[:-1] + (", " if claims else "") + f'"{name}": {value_text}' + "}"


@FUZZ
@given(slot=st.sampled_from(["subject_token", "actor_token"]), name=CLAIM_NAMES, value=json_texts)
def test_validly_signed_tokens_with_any_claim_value_never_5xx(http, ehr, slot, name, value):
    claims = ehr.access_claims() if slot == "subject_token" else ehr.id_claims()
    token = _signed({"alg": "RS256", "kid": ehr.kid}, _with_claim(claims, name, value), ehr.key, "RS256")
    if len(token) > 16 * 1024:
        return
    fields = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
              "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET}
    fields[slot] = token
    r = post_token(http, fields)
    assert r.status_code < 500, r.get_data(as_text=True)


@FUZZ
@given(part=st.sampled_from(["header", "payload"]), raw=json_texts)
def test_tokens_whose_json_is_anything_never_5xx(http, ehr, part, raw):
    header = raw if part == "header" else json.dumps({"alg": "RS256", "kid": ehr.kid})
    payload = raw if part == "payload" else json.dumps(ehr.access_claims())
    signing_input = f"{_b64(header.encode('utf-8', 'surrogatepass'))}.{_b64(payload.encode('utf-8', 'surrogatepass'))}"
    token = signing_input + "." + _b64(jwt.get_algorithm_by_name("RS256").sign(signing_input.encode(), ehr.key))
    if len(token) > 16 * 1024:
        return
    r = post_token(http, {"grant_type": TE, "subject_token": token, "subject_token_type": AT,
                          "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET})
    assert r.status_code < 500, r.get_data(as_text=True)
    assert r.status_code != 200 or part == "payload"


@pytest.fixture
def inline_client(world, tmp_path):
    """A private_key_jwt client with an inline JWKS: assertions are checked without
    any outbound call."""
    from test_private_key_jwt import VendorKeys
    keys = VendorKeys("ES384", "fuzz-k1")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [keys.jwk()]}))
    world("client", "add", "backend", "--jwks-file", str(tmp_path / "jwks.json"))
    return keys


@FUZZ
@given(where=st.sampled_from(["claim", "header", "payload"]), name=CLAIM_NAMES | st.sampled_from(["jti", "jku", "kid"]),
       value=json_texts)
def test_client_assertions_carrying_anything_never_5xx(http, ehr, inline_client, where, name, value):
    now = int(time.time())
    claims = {"iss": "backend", "sub": "backend", "aud": "http://te.test/token", "exp": now + 120, "iat": now,
              "jti": uuid.uuid4().hex}
    header = {"alg": "ES384", "kid": inline_client.kid}
    if where == "claim":
        assertion = _signed(header, _with_claim(claims, name, value), inline_client.key, "ES384")
    elif where == "header":
        text_header = _with_claim(header, name, value)
        si = f"{_b64(text_header.encode('utf-8', 'surrogatepass'))}.{_b64(json.dumps(claims).encode())}"
        assertion = si + "." + _b64(jwt.get_algorithm_by_name("ES384").sign(si.encode(), inline_client.key))
    else:
        assertion = f"{_b64(json.dumps(header).encode())}.{_b64(value.encode('utf-8', 'surrogatepass'))}.{_b64(b'sig')}"
    r = post_token(http, {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
                          "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET,
                          "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                          "client_assertion": assertion}, auth=None)
    assert r.status_code < 500, r.get_data(as_text=True)


def _upstream_documents():
    keys = st.lists(json_texts, max_size=3).map(lambda ks: '{"keys": [' + ",".join(ks) + "]}")
    return st.one_of(json_texts, keys, CONTROL.map(lambda t: t.encode("utf-8", "surrogatepass").decode("latin-1")))


@FUZZ
@given(doc=_upstream_documents(), cache_control=st.sampled_from(["", "max-age=" + "9" * 5000, "max-age=-1",
                                                                   "no-store", "max-age=1e9"]))
def test_any_issuer_jwks_document_never_5xx(http, ehr, app, doc, cache_control):
    app.extensions["token_exchange"].jwks_cache._entries.clear()  # each example fetches afresh
    headers = (("Cache-Control", cache_control),) if cache_control else ()
    ehr.replies["jwks"] = Scripted(body=doc.encode("utf-8", "surrogatepass"), headers=headers)
    try:
        r = post_token(http, {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
                              "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET})
    finally:
        ehr.reset_hostile()
    assert r.status_code < 500, r.get_data(as_text=True)


@FUZZ
@given(doc=_upstream_documents(), name=CLAIM_NAMES | st.sampled_from(["active", "token_type"]), value=json_texts)
def test_any_introspection_answer_never_5xx(http, ehr, doc, name, value):
    now = int(time.time())
    base = {"active": True, "sub": "user-1", "client_id": UPSTREAM, "scope": "patient/*.rs", "aud": SOURCE,
            "exp": now + 300}
    body = doc if name == "x" else _with_claim(base, name, value)
    ehr.replies["introspect"] = Scripted(body=body.encode("utf-8", "surrogatepass"))
    try:
        r = post_token(http, {"grant_type": TE, "subject_token": "opaque-fuzz", "subject_token_type": AT,
                              "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET})
    finally:
        ehr.reset_hostile()
    assert r.status_code < 500, r.get_data(as_text=True)


# -- issue 26: every document and header the service reads from outside ------------------
# (Retry-After: tests/test_matching.py; WWW-Authenticate is only written, never read.)
import re  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from token_exchange.consent.signin import SignIn, SignInError, web_origin  # noqa: E402
from token_exchange.fhir_client import FHIR_ID, FHIRClient, FHIRUnavailable  # noqa: E402
from token_exchange.matching import Identifier, Malformed, searchset_matches  # noqa: E402
from token_exchange.upstream import Reply, decode_json  # noqa: E402

ORIGIN = re.compile(r"https?://[a-z0-9.\-\[\]:]+\Z")
HOSTS = st.sampled_from(["127.0.0.1", "ehr.example", "EHR.Example.", "[::1]", "[::1", "::1]", "[fe80::1%eth0]",
                         "[fe80::1%25eth0]", "[v1.x]", "[::ffff:1.2.3.4]", "a_b.example", "-a.example", "xn--e1a.ru",
                         "ehr.example;frame-ancestors *", "ehr.example'", 'ehr."x"', "ehr example", "", "é.example",
                         "user:pw@ehr.example", "@ehr.example", "ehr.example\\@evil", "1.2.3.4.5", "0x7f.1"])
PORTS = st.sampled_from(["", ":", ":80", ":8080", ":65535", ":65536", ":99999", ":-1", ":x", ": 1", ":０", ":80:81"])
urlish = st.builds(lambda scheme, host, port, rest: f"{scheme}{host}{port}{rest}",
                   st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "//", "http:", "javascript://", ""]),
                   HOSTS | text, PORTS, st.sampled_from(["", "/", "/authorize", "?q=1", "#f", ";x", " /a", "/a b"])
                   | text)


@given(url=urlish | text | st.sampled_from([None, 1, 1.5, True, [], {}, b"http://a"]))
@settings(max_examples=1500, deadline=None)
def test_web_origin_never_raises_and_gives_only_a_plain_origin(url):
    got = web_origin(url)
    if got is not None:
        assert ORIGIN.match(got) and not any(c in got for c in ";'\" ,\\%"), (url, got)
        assert web_origin(got) == got, (url, got)  # an origin is its own origin


@pytest.mark.parametrize("url", ["http://[fe80::1%25eth0]/authorize", "http://[fe80::1%eth0]/authorize",
                                 "https://[v1.x]/authorize"])
def test_web_origin_refuses_scoped_ipv6_and_ipvfuture_hosts(url):
    """A zone id (RFC 6874) is local to this machine and no browser's origin; an IPvFuture
    literal (RFC 3986 §3.2.2) lost its brackets and named another host."""
    assert web_origin(url) is None


DISCOVERY_FIELDS = st.sampled_from(["issuer", "jwks_uri", "authorization_endpoint", "token_endpoint",
                                    "introspection_endpoint", "subject_types_supported",
                                    "id_token_signing_alg_values_supported", "x"])


def _discovery_text(issuer, field, value):
    base = {"issuer": issuer, "jwks_uri": issuer + "/jwks", "authorization_endpoint": issuer + "/authorize",
            "token_endpoint": issuer + "/token"}
    return _with_claim(base, field, value)


class _Stub:
    """An Upstream that answers every GET with one decoded document."""

    def __init__(self, doc, status=200):
        self.doc, self.status = doc, status

    def get_json(self, url, headers=None, deadline=None, max_bytes=None):
        return Reply(self.status, {}, self.doc, url)


@FUZZ
@given(field=DISCOVERY_FIELDS, value=json_texts, raw=st.booleans())
def test_any_discovery_document_disables_sign_in_or_gives_two_valid_endpoints(field, value, raw):
    issuer_url = "http://ehr.example/as"
    try:
        doc = decode_json((value if raw else _discovery_text(issuer_url, field, value)).encode("utf-8", "surrogatepass"))
    except (ValueError, UnicodeDecodeError):
        return  # the outbound client refuses it before anyone reads it
    signin = SignIn(SimpleNamespace(issuer="http://te.test"), _Stub(doc))
    issuer = SimpleNamespace(url=issuer_url, login_client_id="te", authorization_endpoint=None, token_endpoint=None)
    try:
        auth, token = signin.endpoints(issuer)
    except SignInError as e:
        assert e.status in (502, 503)
        return
    assert web_origin(auth) is not None and web_origin(token) is not None


@settings(FUZZ, max_examples=200 if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else 60)  # a CLI run each
@given(where=st.sampled_from(["discovery", "jwks"]), field=DISCOVERY_FIELDS, value=json_texts,
       jwks=_upstream_documents())
def test_any_discovery_or_jwks_document_never_crashes_issuer_add_discover_or_issuer_check(cli, ehr, env, where, field,
                                                                                         value, jwks):
    from token_exchange.cli.issuer_check import check
    from token_exchange.settings import Settings
    if where == "discovery":
        body = _discovery_text(ehr.issuer, field, value)
        ehr.replies[".well-known/openid-configuration"] = Scripted(body=body.encode("utf-8", "surrogatepass"))
    else:
        ehr.replies["jwks"] = Scripted(body=jwks.encode("utf-8", "surrogatepass"))
    try:
        report = check(ehr.issuer, None, None, None, Settings.from_env(dict(env, TOKEN_EXCHANGE_HTTP_TIMEOUT="2")))
        assert all(c["outcome"] in ("ok", "fail", "note") for c in report.checks)
        r = cli("issuer", "add", ehr.issuer, "--discover", "--source", SOURCE, check=False)  # raises on a crash
        assert r.exit_code in (0, 1), r.output
        if r.exit_code:
            (line,) = r.stderr.splitlines()
            assert line.startswith("error: "), r.stderr
        else:
            cli("issuer", "remove", ehr.issuer, "--yes")
    finally:
        ehr.reset_hostile()


BUNDLE_FIELDS = st.sampled_from(["total", "link", "entry", "x"])
ENTRY_FIELDS = st.sampled_from(["resource", "search", "fullUrl"])
RESOURCE_FIELDS = st.sampled_from(["resourceType", "id", "identifier", "active", "link"])


@FUZZ
@given(where=st.sampled_from(["bundle", "entry", "resource", "whole"]), name=BUNDLE_FIELDS | ENTRY_FIELDS |
       RESOURCE_FIELDS, value=json_texts)
def test_any_searchset_is_read_or_refused_as_malformed_never_crashes(where, name, value):
    ident = Identifier("urn:s", "1")
    resource = {"resourceType": "Patient", "id": "t-1", "identifier": [{"system": "urn:s", "value": "1"}]}
    entry = {"fullUrl": "http://t.example/fhir/Patient/t-1", "resource": resource, "search": {"mode": "match"}}
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": [entry],
              "link": [{"relation": "next", "url": "http://evil.example/fhir/Patient?page=2"}]}
    container = {"bundle": bundle, "entry": entry, "resource": resource}.get(where)
    text_doc = _with_claim(bundle, name, value) if where == "bundle" else value if where == "whole" else None
    try:
        if text_doc is None:
            inner = decode_json(value.encode("utf-8", "surrogatepass"))
            container[name] = inner
            doc = bundle
        else:
            doc = decode_json(text_doc.encode("utf-8", "surrogatepass"))
    except (ValueError, UnicodeDecodeError):
        return  # the outbound client refuses it before anyone reads it
    try:  # what the search reads: a searchset Bundle, else FHIRUnavailable
        doc = FHIRClient(_Stub(doc)).search("http://t.example/fhir", "tok", "urn:s", "1", None)
    except FHIRUnavailable:
        return
    try:
        found, ambiguous = searchset_matches(doc, ident)
    except Malformed:
        return
    assert isinstance(ambiguous, bool) and all(isinstance(p, str) and FHIR_ID.match(p) for p in found)


@pytest.mark.parametrize("name", ["exp", "iat", "nbf"])
def test_a_token_time_that_is_an_integer_beyond_any_float_is_invalid_request_not_500(exchange, ehr, name):
    """1 followed by 400 zeros parses as a JSON integer but fits no float (jose.is_number)."""
    token = _signed({"alg": "RS256", "kid": ehr.kid}, _with_claim(ehr.access_claims(), name, "1" + "0" * 400),
                    ehr.key, "RS256")
    r = exchange(subject_token=token)
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_request", r.get_data(as_text=True)
