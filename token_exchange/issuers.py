"""Trusted issuers' keys and endpoints: discovery, a JWKS cache, upstream introspection.

Every call goes through ``upstream.Upstream`` (total deadline, size cap, no
cookies, no redirects). Once a JWKS is cached no network call happens per
request. Fetches of one JWKS URI happen at most once per
``jwks_min_refetch`` seconds, whatever the reason (expiry, an unknown ``kid``,
a key set never fetched yet) and whatever the outcome: a failure is cached
too (negative caching), so neither forged kids nor requests naming a failing
issuer or client can turn the service into a traffic amplifier or make each
request wait on a broken upstream. While an upstream is down its cached keys
keep serving for up to ``jwks_stale_max`` seconds (stale-if-error).
"""
from __future__ import annotations

import logging
import re
import threading
import time
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import jwt

from .upstream import UpstreamError, redact

log = logging.getLogger(__name__)
_MAX_AGE = re.compile(r"max-age=(\d+)")
_NO_STORE = re.compile(r"no-store|no-cache")
MAX_KEYS = 64  # keys read from one JWKS; the rest are ignored
_MAX_AGE_CAP = 10 ** 9  # seconds; a longer max-age is read as this (int() of 5,000 digits raises)


def max_age(headers) -> int | None:
    """The max-age of a response's Cache-Control, if it gives one; 0 for no-store/no-cache."""
    value = headers.get("Cache-Control", "") or ""
    if _NO_STORE.search(value):
        return 0
    m = _MAX_AGE.search(value)
    if m is None:
        return None
    digits = m.group(1)
    return int(digits) if len(digits) <= 9 else _MAX_AGE_CAP


class IssuerUnavailable(Exception):
    """The issuer's (or client's) JWKS or introspection endpoint could not be used."""


class UnknownKey(Exception):
    """No key with that kid (or, without a kid, no usable key) in the JWKS."""


class Key(NamedTuple):
    kid: str  # "" for a key without kid
    jwk: object  # jwt.PyJWK
    alg: str | None  # the JWK's own "alg", when it names one


def import_keys(doc) -> list:
    """A JWKS document -> [Key] of its usable signature keys. Keys of an unknown
    type or curve, malformed ones and encryption keys are skipped; a document that
    is not a JWKS raises ValueError."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS")
    keys = []
    for k in doc["keys"][:MAX_KEYS]:
        if not isinstance(k, dict) or k.get("use", "sig") != "sig":
            continue
        kid = k.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        alg = k.get("alg")
        try:
            keys.append(Key(kid or "", jwt.PyJWK(k), alg if isinstance(alg, str) else None))
        except Exception:  # noqa: BLE001 - any key PyJWT cannot use is skipped, whatever it raises
            continue
    return keys


class _Entry:
    __slots__ = ("keys", "by_kid", "fetched", "expires", "last_attempt", "lock")

    def __init__(self):
        self.keys: list | None = None  # [Key]
        self.by_kid: dict = {}  # kid -> PyJWK, the first of each kid
        self.fetched = 0.0
        self.expires = 0.0
        self.last_attempt = -1e9
        self.lock = threading.Lock()


class JWKSCache:
    """JWKS URI -> keys, fetched through Upstream and cached as described above."""

    def __init__(self, settings, upstream, metrics=None):
        self.settings = settings
        self.upstream = upstream
        self.metrics = metrics  # jwks_fetches, jwks_fetch_failures: an issuer's or a client's
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def _entry(self, uri: str) -> _Entry:
        e = self._entries.get(uri)
        if e is None:
            with self._lock:
                e = self._entries.setdefault(uri, _Entry())
        return e

    def key_for(self, jwks_uri: str, kid: str | None, alg: str):
        """The verification key for (kid, alg), refreshing the cache when it may."""
        e = self._entry(jwks_uri)
        if e.keys is None or time.monotonic() >= e.expires:
            self._refresh(e, jwks_uri)
        key = self._pick(e, kid, alg)
        if key is None and self._may_fetch(e):
            self._refresh(e, jwks_uri, force=True)  # the issuer may have rotated
            key = self._pick(e, kid, alg)
        if key is None:
            raise UnknownKey()
        return key

    def keys(self, uri: str, kid: str | None = None) -> list:
        """[Key] of the JWKS at uri; refetched (at most once per interval)
        when ``kid`` is given and none of the cached keys has it."""
        e = self._entry(uri)
        if e.keys is None or time.monotonic() >= e.expires:
            self._refresh(e, uri)
        if kid is not None and kid not in e.by_kid and self._may_fetch(e):
            self._refresh(e, uri, force=True)
        return e.keys or []

    def _may_fetch(self, e: _Entry) -> bool:
        return time.monotonic() - e.last_attempt >= self.settings.jwks_min_refetch

    @staticmethod
    def _pick(e: _Entry, kid, alg):
        if not e.keys:
            return None
        if kid is not None:
            k = e.by_kid.get(kid)
            return k if k is not None and (k.algorithm_name in (None, alg)) else None  # a PyJWK
        candidates = [k.jwk for k in e.keys if k.jwk.algorithm_name in (None, alg)]
        return candidates[0] if len(candidates) == 1 else None

    def _refresh(self, e: _Entry, uri: str, force: bool = False) -> None:
        """Fetch the JWKS, at most once per jwks_min_refetch: otherwise serve what is
        cached (even stale), or refuse at once when nothing usable is."""
        s = self.settings
        # Concurrent requests for one URI share one fetch: those that have no keys
        # wait for it (bounded by the fetch's deadline); those with cached keys, even
        # expired ones, go on with them meanwhile.
        if not e.lock.acquire(blocking=e.keys is None):
            return
        try:
            now = time.monotonic()
            if not force and e.keys is not None and now < e.expires:
                return  # refreshed while this thread waited
            if now - e.last_attempt < s.jwks_min_refetch:
                if e.keys is not None:
                    return  # a recent fetch stands (stale-if-error included)
                raise IssuerUnavailable()  # negative caching: it failed moments ago
            e.last_attempt = now
            try:
                r = self.upstream.get_json(uri)
                if r.status != 200:
                    raise UpstreamError("unexpected status", r.status, r.url)
                keys = import_keys(r.json)
                if not keys:
                    raise ValueError("no usable keys")
            except (UpstreamError, ValueError) as exc:
                self._count("jwks_fetch_failures")
                log.warning("jwks fetch failed", extra={"jwks_uri": redact(uri),
                                                        "reason": getattr(exc, "reason", None) or str(exc)})
                if e.keys is not None and now - e.fetched < s.jwks_stale_max:
                    e.expires = now + s.jwks_min_refetch  # stale-if-error
                    return
                e.keys, e.by_kid = None, {}
                raise IssuerUnavailable() from None
            advertised = max_age(r.headers)
            ttl = s.jwks_cache_ttl if advertised is None else min(advertised, s.jwks_cache_ttl)
            by_kid: dict = {}
            for k in keys:
                by_kid.setdefault(k.kid, k.jwk)
            e.keys, e.by_kid = keys, by_kid
            e.fetched, e.expires = now, now + max(s.jwks_min_refetch, ttl)
            self._count("jwks_fetches")
        finally:
            e.lock.release()

    def _count(self, name):
        if self.metrics is not None:
            self.metrics.inc(name)


# RFC 7662 §2.2 token_type, RFC 8693 §3: the answers that name an access token.
ACCESS_TOKEN_TYPES = ("access_token", "bearer", "urn:ietf:params:oauth:token-type:access_token")


def introspect(upstream, issuer, token: str, deadline=None) -> dict:
    """RFC 7662 at the issuer's introspection endpoint, hinting that the token is an
    access token (§2.1 token_type_hint); raises IssuerUnavailable."""
    try:
        r = upstream.post_form(issuer.introspection_endpoint,
                               {"token": token, "token_type_hint": "access_token"},
                               auth=(issuer.introspection_client_id or "", issuer.introspection_secret or ""),
                               deadline=deadline)
    except UpstreamError:
        raise IssuerUnavailable() from None
    if r.status != 200 or not isinstance(r.json, dict):
        log.warning("introspection refused or malformed", extra={"url": r.url, "status": r.status})
        raise IssuerUnavailable()
    return r.json


def discover(issuer_url: str, timeout: int = 10, upstream=None) -> dict:
    """OIDC discovery, else the RFC 8414 location; the document's issuer must match."""
    if upstream is None:
        from types import SimpleNamespace

        from .upstream import Upstream
        upstream = Upstream(SimpleNamespace(http_timeout=timeout))
    parts = urlsplit(issuer_url)
    path = parts.path.rstrip("/")
    candidates = [
        issuer_url.rstrip("/") + "/.well-known/openid-configuration",
        urlunsplit((parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", "")),
    ]
    last = None
    for url in candidates:
        shown = redact(url)
        try:
            r = upstream.get_json(url, deadline=timeout)
        except UpstreamError as exc:
            last = f"{shown}: {exc.reason}"
            continue
        if r.status != 200:
            last = f"{shown} answered HTTP {r.status}"
            continue
        doc = r.json
        if not isinstance(doc, dict):
            last = f"{shown} is not a JSON object"
            continue
        if doc.get("issuer") != issuer_url:
            named = doc.get("issuer")
            named = redact(named) if isinstance(named, str) else named
            raise ValueError(f"discovery document at {shown} names issuer {named!r}, not {redact(issuer_url)!r}")
        if not isinstance(doc.get("jwks_uri"), str) or not doc["jwks_uri"]:
            raise ValueError(f"discovery document at {shown} has no jwks_uri (a URL string)")
        return doc
    raise ValueError(f"no discovery document found for {redact(issuer_url)} ({last})")
