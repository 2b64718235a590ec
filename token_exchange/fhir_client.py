"""Outbound FHIR for matching patients and users (contract, "Patient matching at the
target", "The user at the target"): the identifier search at a target, and the read of
the source Patient (or the user's own resource) at an EHR with a
SMART Backend Services token the service obtains itself.

Every call goes through ``upstream.Upstream`` (a total deadline shared by the
calls of one match, a size cap, no cookies, no redirects) behind ``_call``. Any
answer other than the one expected raises ``FHIRUnavailable``, naming the party,
the URL (redacted) and the status: matching turns it into 503
temporarily_unavailable, and stores nothing.
"""
from __future__ import annotations

import email.utils
import logging
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import quote, urlsplit, urlunsplit

from .keys import BACKEND_SERVICES_ALGS
from .upstream import UpstreamError, redact

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
SEARCH_SCOPE = "system/Patient.rs"  # SMART v2: search and read Patient, nothing else
BACKEND_SCOPE = "system/Patient.rs"  # the default --fhir-scope at an EHR
SEARCH_TOKEN_LIFETIME = 60  # seconds; the contract's bound for the self-minted search token
DEFAULT_RETRY_AFTER = 30
MAX_RETRY_AFTER = 3600
DISCOVERY_TTL = 3600  # a discovered token endpoint is used this long
TOKEN_REFRESH_MARGIN = 60  # a cached Backend Services token is renewed this long before it expires
MAX_TOKEN_LIFETIME = 86400  # longer expires_in values are read as this
# FHIR R4 id datatype: the only patient ids put into a read URL.
# FHIR R4 id: [A-Za-z0-9\-\.]{1,64}; "." and ".." are refused too: as a path segment they
# are dot segments (RFC 3986 §5.2.4), so no URL built from them names a Patient.
FHIR_ID = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9\-.]{1,64}\Z")


class FHIRUnavailable(Exception):
    """The target or the EHR gave no usable answer. ``party`` is "target" or "EHR",
    ``where`` its redacted URL, ``status`` the HTTP status when there was one,
    ``reason`` a short phrase safe to log, ``retry_after`` seconds to tell the client."""

    def __init__(self, party: str, where: str, reason: str, status: int | None = None,
                 retry_after: int = DEFAULT_RETRY_AFTER):
        super().__init__(reason)
        self.party, self.where, self.reason, self.status, self.retry_after = party, where, reason, status, retry_after

    def __str__(self):
        status = f" (HTTP {self.status})" if self.status is not None else ""
        return f"the {self.party} at {self.where}: {self.reason}{status}"


def fhir_escape(value: str) -> str:
    """FHIR R4 search, 3.1.1.5.7: a backslash before \\ | , $ in a parameter value."""
    for c in "\\|,$":
        value = value.replace(c, "\\" + c)
    return value


def search_url(base: str, system: str, value: str, resource_type: str = "Patient") -> str:
    """GET {base}/{Type}?identifier={system}|{value}&_count=2, the value escaped
    (FHIR) and the whole token percent-encoded (RFC 3986)."""
    token = quote(f"{system}|{fhir_escape(value)}", safe="")
    return f"{base.rstrip('/')}/{resource_type}?identifier={token}&_count=2"


def search_scope(resource_type: str) -> str:
    """SMART v2: search and read that type, nothing else (system/Patient.rs, system/Practitioner.rs)."""
    return f"system/{resource_type}.rs"


def _call(upstream, party: str, method: str, url: str, deadline, headers=None, data=None):
    """The one way matching reaches outside: Upstream, its failures as FHIRUnavailable."""
    try:
        if method == "GET":
            return upstream.get_json(url, headers=headers, deadline=deadline)
        return upstream.post_form(url, data, headers=headers, deadline=deadline)
    except UpstreamError as e:
        raise FHIRUnavailable(party, redact(url), e.reason, e.status) from None


def _refused(party: str, reply) -> FHIRUnavailable:
    """A non-200 answer: 429 carries the other side's Retry-After (RFC 9110 §10.2.3)."""
    retry = retry_after(reply.headers.get("Retry-After")) if reply.status == 429 else DEFAULT_RETRY_AFTER
    return FHIRUnavailable(party, reply.url, "unexpected answer", reply.status, retry)


_DELAY_SECONDS = re.compile(r"[0-9]+")


def retry_after(value) -> int:
    """RFC 9110 §10.2.3: delay-seconds or an HTTP-date -> seconds in [1, 3600]; else 30."""
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        return DEFAULT_RETRY_AFTER
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):  # 1*DIGIT, ASCII only (str.isdigit takes any script's digits)
        seconds = int(value[:7])
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return DEFAULT_RETRY_AFTER
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = int((when - datetime.now(timezone.utc)).total_seconds())
    return max(1, min(seconds, MAX_RETRY_AFTER))


def search_token(key, issuer: str, target: str, scope: str = SEARCH_SCOPE) -> tuple[str, str]:
    """The bearer token the service mints for its own search (RFC 9068 at+jwt, signed
    with the active key, so the target verifies it with the service's JWKS): exactly
    iss, aud, sub = client_id = the service, scope, iat, exp (60 s), jti -> (token, jti)."""
    now, jti = int(time.time()), uuid.uuid4().hex
    claims = {"iss": issuer, "aud": target, "sub": issuer, "client_id": issuer, "scope": scope,
              "iat": now, "exp": now + SEARCH_TOKEN_LIFETIME, "jti": jti}
    return key.mint(claims), jti


class FHIRClient:
    """Patient search at targets and Patient reads at EHRs, over one Upstream."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.backend = BackendServices(upstream)

    def search(self, base: str, token: str, system: str, value: str, deadline, resource_type: str = "Patient") -> dict:
        """One identifier search -> the searchset Bundle (anything else: FHIRUnavailable)."""
        reply = _call(self.upstream, "target", "GET", search_url(base, system, value, resource_type), deadline,
                      headers={"Accept": FHIR_JSON, "Prefer": "handling=strict", "Authorization": f"Bearer {token}"})
        if reply.status != 200:
            raise _refused("target", reply)
        doc = reply.json
        if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle" or doc.get("type") != "searchset":
            raise FHIRUnavailable("target", reply.url, "the answer is not a searchset Bundle", reply.status)
        return doc

    def read_patient(self, issuer, key, source: str, patient: str, deadline) -> dict | None:
        """GET {source}/Patient/{patient} with a Backend Services token -> the Patient
        (its resourceType and id checked); None when the id cannot name a FHIR read."""
        return self.read(issuer, key, source, "Patient", patient, deadline)

    def read(self, issuer, key, source: str, resource_type: str, rid: str, deadline,
             scope: str | None = None) -> dict | None:
        """GET {source}/{Type}/{id} with a Backend Services token (scope: the issuer's
        --fhir-scope, else ``scope``, else system/Patient.rs) -> the resource (its
        resourceType and id checked); None when the id cannot name a FHIR read."""
        if not FHIR_ID.match(rid):
            return None  # RFC 3986 §5.2.4: a dot segment, even as %2E, would be removed and read {source}/
        token = self.backend.token(issuer, key, deadline, scope)
        url = f"{source.rstrip('/')}/{resource_type}/{quote(rid, safe='')}"
        reply = _call(self.upstream, "EHR", "GET", url, deadline,
                      headers={"Accept": FHIR_JSON, "Authorization": f"Bearer {token}"})
        if reply.status == 401:
            self.backend.forget(issuer, key, scope)  # revoked or expired early: the next match asks again
        if reply.status != 200:
            raise _refused("EHR", reply)
        doc = reply.json
        if not isinstance(doc, dict) or doc.get("resourceType") != resource_type or doc.get("id") != rid:
            raise FHIRUnavailable("EHR", reply.url, f"the answer is not {resource_type}/{rid}", reply.status)
        return doc


class BackendServices:
    """SMART Backend Services at EHRs (SMART App Launch 2.x, "Backend Services"):
    client_credentials with a private_key_jwt assertion signed by the service's
    active key (RS384 or ES384). The access token is cached per (issuer, client id,
    scope, token endpoint, key) until TOKEN_REFRESH_MARGIN before it expires;
    concurrent requests for one entry wait for one token request."""

    def __init__(self, upstream):
        self.upstream = upstream
        self._tokens: dict = {}  # cache key -> (access token, usable until (monotonic))
        self._endpoints: dict = {}  # issuer url -> (token endpoint, until)
        self._locks: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def scope(issuer, wanted: str | None = None) -> str:
        """The scope asked for: the issuer's --fhir-scope, else ``wanted``, else system/Patient.rs."""
        return issuer.fhir_scope or wanted or BACKEND_SCOPE

    @classmethod
    def _key(cls, issuer, key, wanted=None) -> tuple:
        return (issuer.url, issuer.fhir_client_id, cls.scope(issuer, wanted), issuer.token_endpoint, key.kid)

    def forget(self, issuer, key, wanted: str | None = None) -> None:
        self._tokens.pop(self._key(issuer, key, wanted), None)

    def token(self, issuer, key, deadline, wanted: str | None = None) -> str:
        k = self._key(issuer, key, wanted)
        hit = self._tokens.get(k)
        if hit is not None and time.monotonic() < hit[1]:
            return hit[0]
        with self._lock:
            lock = self._locks.setdefault(k, threading.Lock())
        with lock:
            hit = self._tokens.get(k)
            if hit is not None and time.monotonic() < hit[1]:
                return hit[0]
            token, lifetime = self._request(issuer, key, deadline, self.scope(issuer, wanted))
            margin = min(TOKEN_REFRESH_MARGIN, lifetime // 4)
            self._tokens[k] = (token, time.monotonic() + lifetime - margin)
            return token

    def _request(self, issuer, key, deadline, scope: str) -> tuple[str, int]:
        endpoint = self.token_endpoint(issuer, deadline)
        if key.alg not in BACKEND_SERVICES_ALGS:  # SMART Backend Services: RS384 or ES384 only
            raise FHIRUnavailable("EHR", redact(endpoint), f"a {key.alg} signing key cannot sign Backend Services "
                                  "assertions (RS384 or ES384): rotate to an RSA or P-384 key")
        assertion = key.client_assertion(issuer.fhir_client_id, endpoint)
        # RFC 6749 §4.4 client_credentials; RFC 7523 §2.2 client_assertion.
        reply = _call(self.upstream, "EHR", "POST", endpoint, deadline, data={
            "grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion})
        if reply.status != 200:
            raise _refused("EHR", reply)
        body = reply.json
        token = body.get("access_token") if isinstance(body, dict) else None
        token_type = body.get("token_type") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token or len(token) > 16384 or any(c.isspace() for c in token) \
                or not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise FHIRUnavailable("EHR", reply.url, "the token response has no bearer access_token", reply.status)
        expires_in = body.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or expires_in <= 0:
            expires_in = 300  # SMART: expires_in SHOULD be at most 300; absent, assume that
        return token, int(min(expires_in, MAX_TOKEN_LIFETIME))

    def token_endpoint(self, issuer, deadline) -> str:
        """The issuer's registered token endpoint, else its discovery document's
        (OpenID Connect Discovery §4, else RFC 8414 §3), cached for an hour."""
        if issuer.token_endpoint:
            return issuer.token_endpoint
        hit = self._endpoints.get(issuer.url)
        if hit is not None and time.monotonic() < hit[1]:
            return hit[0]
        parts = urlsplit(issuer.url)
        candidates = (issuer.url.rstrip("/") + "/.well-known/openid-configuration",
                      urlunsplit((parts.scheme, parts.netloc,
                                  "/.well-known/oauth-authorization-server" + parts.path.rstrip("/"), "", "")))
        last = None
        for url in candidates:
            reply = _call(self.upstream, "EHR", "GET", url, deadline)
            doc = reply.json
            if reply.status == 200 and isinstance(doc, dict) and doc.get("issuer") == issuer.url \
                    and _http_url(doc.get("token_endpoint")):
                self._endpoints[issuer.url] = (doc["token_endpoint"], time.monotonic() + DISCOVERY_TTL)
                return doc["token_endpoint"]
            last = reply
        raise FHIRUnavailable("EHR", last.url, "no discovery document names a token endpoint", last.status)


def _http_url(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not parts.fragment
