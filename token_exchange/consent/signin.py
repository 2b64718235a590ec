"""The OpenID Connect sign-in at the EHR, with Authlib's client: the authorization
URL (authorization code, PKCE S256, state, nonce), the code exchange and the ID
token's validation (``authlib.oidc.core.CodeIDToken``). Every call to the EHR goes
through the one outbound client (``outbound``); nothing is kept here but the EHR's
discovery document for a few minutes.

The service is the EHR's OpenID Connect client ``--login-client-id`` with the
redirect URI ``<TOKEN_EXCHANGE_ISSUER>/consent/callback``; it authenticates with
``--login-secret-env``'s secret (client_secret_basic) or else private_key_jwt
signed with the service's active key.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import threading
import time
from urllib.parse import urlencode, urlsplit

from authlib.common.urls import url_decode
from authlib.oauth2 import OAuth2Error as AuthlibOAuth2Error
from authlib.oauth2.client import OAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from ..upstream import Deadline, UpstreamError

log = logging.getLogger(__name__)
SCOPE = "openid fhirUser"
LEEWAY = 60  # as for every token the service validates (contract rule 1)
DISCOVERY_TTL = 300


_HOST_NAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z")


def web_origin(url) -> str | None:
    """The origin (RFC 6454: scheme, host, port) of an absolute http(s) URL, rebuilt from
    validated parts, or None. Only such an origin may enter a header (the consent pages'
    CSP form-action): a URL carrying ';', spaces, quotes or a broken authority never does."""
    if not isinstance(url, str) or len(url) > 2048 or not url.isascii() or not url.isprintable() \
            or any(c.isspace() or c in ";,'\"\\" for c in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host or parts.username is not None or parts.password is not None:
        return None
    if ":" in host or "[" in parts.netloc:  # an IP literal (RFC 3986 §3.2.2): IPv6 only, without a zone id
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            return None
        if address.scope_id is not None:
            return None
        host = f"[{address.compressed}]"
    elif not _HOST_NAME.match(host):
        return None
    return f"{parts.scheme}://{host.lower()}" + (f":{port}" if port is not None else "")


class SignInError(Exception):
    """The sign-in did not give a usable identity. ``status`` for the page (400 for a
    broken or forged callback, 403 for a refusal, 502 when the EHR could not be
    used); ``message`` is shown to the person; ``detail`` goes to the log only."""

    def __init__(self, status: int, message: str, detail: str = ""):
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


class _Response:
    """What Authlib's client reads of a token-endpoint response."""

    def __init__(self, reply):
        self.status_code, self._json = reply.status, reply.json

    def json(self):
        if self._json is None:
            raise ValueError("no JSON body")
        return self._json

    def raise_for_status(self):
        if not 200 <= self.status_code < 300:
            raise SignInError(502, "The EHR did not complete the sign-in.",
                              f"token endpoint answered HTTP {self.status_code}")


class _OutboundSession:
    """The session Authlib's OAuth2Client posts with, over the one outbound client:
    Authlib prepares the request (client authentication included), the outbound
    client sends it within the deadline and size cap."""

    def __init__(self, upstream, deadline):
        self.upstream, self.deadline = upstream, deadline

    def post(self, url, data=None, headers=None, auth=None, **_):
        body = urlencode(list((data or {}).items()))
        headers = dict(headers or {})
        if auth is not None:
            url, headers, body = auth.prepare("POST", url, headers, body)
        try:
            return _Response(self.upstream.post_form(url, dict(url_decode(body)), headers=headers,
                                                     deadline=self.deadline))
        except UpstreamError as e:
            raise SignInError(502, "The EHR could not be reached to complete the sign-in.", str(e)) from None


class ServiceKeyJWT(PrivateKeyJWT):
    """Authlib's private_key_jwt (RFC 7523 §2.2), signed with the service's active key."""

    def __init__(self, key, token_endpoint):
        super().__init__(token_endpoint)
        self.key = key

    def sign(self, auth, token_endpoint):
        return self.key.client_assertion(auth.client_id, token_endpoint, lifetime=60, backend_services=False)


class SignIn:
    def __init__(self, settings, upstream):
        self.settings, self.upstream = settings, upstream
        self.redirect_uri = settings.issuer + "/consent/callback"
        self._discovered: dict = {}  # issuer url -> (fetched monotonic, document)
        self._lock = threading.Lock()

    # -- endpoints ------------------------------------------------------------------
    def endpoints(self, issuer) -> tuple[str, str]:
        """(authorization endpoint, token endpoint): the issuer's registered ones, else
        from its OpenID Connect discovery document (cached for a few minutes)."""
        if not issuer.login_client_id:
            raise SignInError(503, "Sign-in at this EHR is not set up; ask the service's administrator.",
                              f"issuer {issuer.url} has no --login-client-id")
        auth, token = issuer.authorization_endpoint, issuer.token_endpoint
        if not (auth and token):
            doc = self._discovery(issuer.url)
            auth = auth or doc.get("authorization_endpoint")
            token = token or doc.get("token_endpoint")
        if not (isinstance(auth, str) and isinstance(token, str)):
            raise SignInError(503, "Sign-in at this EHR is not set up; ask the service's administrator.",
                              f"issuer {issuer.url}: no authorization or token endpoint")
        for name, url in (("authorization_endpoint", auth), ("token_endpoint", token)):
            if web_origin(url) is None:  # one EHR's bad document disables its own sign-in only
                log.warning("sign-in disabled for an issuer", extra={
                    "issuer": issuer.url, "reason": f"its {name} is not an absolute http(s) URL with a valid host"})
                raise SignInError(503, "Sign-in at this EHR is not available; ask the service's administrator.",
                                  f"issuer {issuer.url}: {name} is not an absolute http(s) URL with a valid host")
        return auth, token

    def _discovery(self, issuer_url: str) -> dict:
        now = time.monotonic()
        cached = self._discovered.get(issuer_url)
        if cached is not None and now - cached[0] < DISCOVERY_TTL:
            return cached[1]
        url = issuer_url.rstrip("/") + "/.well-known/openid-configuration"
        try:
            doc = self.upstream.get_json(url).json
        except UpstreamError as e:
            raise SignInError(502, "The EHR could not be reached to sign in.", str(e)) from None
        if not isinstance(doc, dict) or doc.get("issuer") != issuer_url:
            raise SignInError(502, "The EHR could not be reached to sign in.",
                              f"discovery at {url}: not a document for issuer {issuer_url}")
        with self._lock:
            self._discovered[issuer_url] = (now, doc)
        return doc

    def _client(self, issuer, key, token_endpoint, deadline=None) -> OAuth2Client:
        secret = issuer.login_secret
        client = OAuth2Client(_OutboundSession(self.upstream, deadline), client_id=issuer.login_client_id,
                              client_secret=secret or None,
                              token_endpoint_auth_method="client_secret_basic" if secret else "private_key_jwt",
                              scope=SCOPE, redirect_uri=self.redirect_uri, code_challenge_method="S256")
        if not secret:
            if key is None:
                raise SignInError(503, "The service has no signing key yet; ask its administrator.",
                                  "no active key for private_key_jwt")
            client.register_client_auth_method(ServiceKeyJWT(key, token_endpoint))
        return client

    # -- the two legs -------------------------------------------------------------------
    def start(self, issuer, aud: str) -> tuple[str, dict]:
        """(the EHR's authorization URL, what the callback needs: kept server-side)."""
        authorization_endpoint, token_endpoint = self.endpoints(issuer)
        pending = {"issuer": issuer.url, "state": secrets.token_urlsafe(32), "nonce": secrets.token_urlsafe(32),
                   "verifier": secrets.token_urlsafe(64)}  # RFC 7636 §4.1: 43-128 characters
        client = OAuth2Client(None, client_id=issuer.login_client_id, scope=SCOPE, redirect_uri=self.redirect_uri,
                              code_challenge_method="S256")
        # OpenID Connect Core §3.1.2.1; SMART App Launch: aud = the FHIR base the user is at.
        url, _ = client.create_authorization_url(authorization_endpoint, state=pending["state"],
                                                 code_verifier=pending["verifier"], nonce=pending["nonce"],
                                                 aud=aud, response_mode="query")
        return url, pending

    def finish(self, issuer, pending: dict, args, key) -> dict:
        """The callback's query -> the ID token's validated claims. The caller has
        already matched ``state``."""
        # RFC 9207 §2.4: when the authorization response names its issuer, it must be ours.
        if "iss" in args and args.get("iss") != pending["issuer"]:
            raise SignInError(400, "The sign-in answer came from another server than the one you were sent to.",
                              "RFC 9207 iss mismatch")
        if args.get("error"):
            raise SignInError(403, "The sign-in at the EHR did not complete, so nothing was approved.",
                              f"authorization error {str(args.get('error'))[:64]}")
        code = args.get("code")
        if not code:
            raise SignInError(400, "The sign-in answer has no authorization code.", "no code")
        _, token_endpoint = self.endpoints(issuer)
        deadline = Deadline(self.settings.http_timeout)  # the code exchange and the keys together
        client = self._client(issuer, key, token_endpoint, deadline)
        try:
            token = client.fetch_token(token_endpoint, grant_type="authorization_code", code=code,
                                       code_verifier=pending["verifier"])
        except AuthlibOAuth2Error as e:
            raise SignInError(400, "The EHR refused to complete the sign-in; start again from the app.",
                              f"token endpoint error {str(e.error)[:64]}") from None
        except ValueError as e:
            raise SignInError(502, "The EHR did not complete the sign-in.", f"token endpoint: {e}") from None
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise SignInError(502, "The EHR did not complete the sign-in.", "no id_token in the token response")
        return self.validate_id_token(issuer, id_token, pending["nonce"], token.get("access_token"), deadline)

    def validate_id_token(self, issuer, id_token: str, nonce: str, access_token, deadline) -> dict:
        """OpenID Connect Core §3.1.3.7: signature by the issuer's key (an algorithm it
        is registered with), iss, aud containing the login client id, azp when
        several audiences, nonce, exp (and at_hash when present)."""
        try:
            keys = self.upstream.get_json(issuer.jwks_uri, deadline=deadline).json
            key_set = KeySet.import_key_set(keys)
            decoded = jwt.decode(id_token, key_set, algorithms=list(issuer.algs))
            claims = CodeIDToken(decoded.claims, decoded.header,
                                 {"iss": {"essential": True, "value": issuer.url},
                                  "aud": {"essential": True, "value": issuer.login_client_id}},
                                 {"nonce": nonce, "client_id": issuer.login_client_id,
                                  "access_token": access_token})
            claims.validate(leeway=LEEWAY)
        except UpstreamError as e:
            raise SignInError(502, "The EHR's keys could not be read to check the sign-in.", str(e)) from None
        except (JoseError, ValueError, TypeError, KeyError) as e:
            raise SignInError(400, "The sign-in could not be verified; start again from the app.",
                              f"ID token refused: {type(e).__name__}: {str(e)[:120]}") from None
        if not isinstance(claims.get("sub"), str):
            raise SignInError(400, "The sign-in could not be verified; start again from the app.", "no sub")
        return dict(claims)
