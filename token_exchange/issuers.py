"""Trusted issuers' keys and endpoints: discovery, a JWKS cache, upstream introspection.

Once an issuer's JWKS is cached no network call happens per request. An
unknown ``kid`` triggers at most one refetch per issuer per
``jwks_min_refetch`` seconds, so forged kids cannot turn the service into a
traffic amplifier against an EHR. While an issuer is down its cached keys keep
serving for up to ``jwks_stale_max`` seconds (stale-if-error).
"""
from __future__ import annotations

import logging
import re
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import jwt
import requests

log = logging.getLogger(__name__)
_MAX_AGE = re.compile(r"max-age=(\d+)")


def max_age(headers) -> int | None:
    """The max-age of a response's Cache-Control, if it gives one."""
    m = _MAX_AGE.search(headers.get("Cache-Control", ""))
    return int(m.group(1)) if m else None


class IssuerUnavailable(Exception):
    """The issuer's JWKS or introspection endpoint could not be used."""


class UnknownKey(Exception):
    """No key with that kid (or, without a kid, no usable key) in the issuer's JWKS."""


class _Entry:
    __slots__ = ("keys", "fetched", "expires", "last_attempt", "lock")

    def __init__(self):
        self.keys: dict | None = None  # kid -> PyJWK ; "" for keys without kid
        self.fetched = 0.0
        self.expires = 0.0
        self.last_attempt = -1e9
        self.lock = threading.Lock()


class JWKSCache:
    def __init__(self, settings, session: requests.Session | None = None, metrics=None):
        self.settings = settings
        self.http = session or requests.Session()
        self.metrics = metrics
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def _entry(self, uri: str) -> _Entry:
        e = self._entries.get(uri)
        if e is None:
            with self._lock:
                e = self._entries.setdefault(uri, _Entry())
        return e

    def key_for(self, jwks_uri: str, kid: str | None, alg: str):
        """The verification key for (kid, alg), refreshing the cache when it must."""
        e = self._entry(jwks_uri)
        now = time.monotonic()
        if e.keys is None or now >= e.expires:
            self._refresh(e, jwks_uri, must=e.keys is None)
        key = self._pick(e, kid, alg)
        if key is None and time.monotonic() - e.last_attempt >= self.settings.jwks_min_refetch:
            self._refresh(e, jwks_uri, must=False)  # the issuer may have rotated
            key = self._pick(e, kid, alg)
        if key is None:
            raise UnknownKey()
        return key

    @staticmethod
    def _pick(e: _Entry, kid, alg):
        if not e.keys:
            return None
        if kid is not None:
            k = e.keys.get(kid)
            return k if k is not None and (k.algorithm_name in (None, alg)) else None
        candidates = [k for k in e.keys.values() if k.algorithm_name in (None, alg)]
        return candidates[0] if len(candidates) == 1 else None

    def _refresh(self, e: _Entry, uri: str, must: bool):
        with e.lock:
            now = time.monotonic()
            if now - e.last_attempt < self.settings.jwks_min_refetch and e.keys is not None:
                return
            if now - e.last_attempt < 1 and e.keys is None and not must:
                return
            e.last_attempt = now
            try:
                r = self.http.get(uri, timeout=self.settings.http_timeout, headers={"Accept": "application/json"})
                r.raise_for_status()
                keyset = jwt.PyJWKSet.from_dict(r.json())
                keys = {}
                for k in keyset.keys:
                    keys.setdefault(k.key_id or "", k)
                ttl, advertised = self.settings.jwks_cache_ttl, max_age(r.headers)
                if advertised is not None:
                    ttl = max(self.settings.jwks_min_refetch, min(advertised, ttl))
                e.keys, e.fetched, e.expires = keys, now, now + ttl
                self._count("jwks_fetches")
            except (requests.RequestException, ValueError, jwt.PyJWKError, jwt.PyJWKSetError) as exc:
                self._count("jwks_fetch_failures")
                log.warning("jwks fetch failed", extra={"jwks_uri": uri, "reason": type(exc).__name__})
                if e.keys is not None and now - e.fetched < self.settings.jwks_stale_max:
                    e.expires = now + self.settings.jwks_min_refetch  # stale-if-error
                    return
                e.keys = None
                raise IssuerUnavailable() from None

    def _count(self, name):
        if self.metrics is not None:
            self.metrics.inc(name)


def introspect(http: requests.Session, issuer, token: str, timeout: int) -> dict:
    """RFC 7662 at the issuer's introspection endpoint; raises IssuerUnavailable."""
    try:
        r = http.post(issuer.introspection_endpoint, data={"token": token},
                      auth=(issuer.introspection_client_id or "", issuer.introspection_secret or ""),
                      headers={"Accept": "application/json"}, timeout=timeout)
        r.raise_for_status()
        body = r.json()
    except (requests.RequestException, ValueError):
        raise IssuerUnavailable() from None
    if not isinstance(body, dict):
        raise IssuerUnavailable()
    return body


def discover(issuer_url: str, timeout: int = 10) -> dict:
    """OIDC discovery, else the RFC 8414 location; the document's issuer must match."""
    parts = urlsplit(issuer_url)
    path = parts.path.rstrip("/")
    candidates = [
        issuer_url.rstrip("/") + "/.well-known/openid-configuration",
        urlunsplit((parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", "")),
    ]
    last = None
    for url in candidates:
        try:
            r = requests.get(url, timeout=timeout, headers={"Accept": "application/json"})
            if r.status_code != 200:
                last = f"{url} answered HTTP {r.status_code}"
                continue
            doc = r.json()
        except (requests.RequestException, ValueError) as exc:
            last = f"{url}: {type(exc).__name__}"
            continue
        if not isinstance(doc, dict):
            last = f"{url} is not a JSON object"
            continue
        if doc.get("issuer") != issuer_url:
            raise ValueError(f"discovery document at {url} names issuer {doc.get('issuer')!r}, not {issuer_url!r}")
        if not doc.get("jwks_uri"):
            raise ValueError(f"discovery document at {url} has no jwks_uri")
        return doc
    raise ValueError(f"no discovery document found for {issuer_url} ({last})")
