"""Client authentication at the token endpoint, on Authlib's ClientAuthentication.

Methods: client_secret_basic, client_secret_post (RFC 6749 §2.3.1) and
private_key_jwt (RFC 7523 §2.2 as SMART Backend Services profiles it).
"""
from __future__ import annotations

import base64
import binascii
import logging
import time

from urllib.parse import unquote

from authlib.oauth2.rfc6749.authenticate_client import ClientAuthentication
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion

from . import jose, urns
from .errors import InvalidClient, InvalidClientError, InvalidRequest
from .issuers import IssuerUnavailable, JWKSCache, import_keys
from .sealing import check_secret

log = logging.getLogger(__name__)
SECRET_METHODS = ("client_secret_basic", "client_secret_post")
CLIENT_ASSERTION_ALGS = ("RS256", "RS384", "PS256", "ES256", "ES384")  # private_key_jwt, as discovery says
ASSERTION_MAX_AHEAD = 300  # SMART Backend Services: exp at most 5 minutes ahead


class AuthClient:
    """A registered client as Authlib's ClientMixin sees it."""

    def __init__(self, cfg, key_secret):
        self.cfg = cfg
        self._key_secret = key_secret
        self.client_id = cfg.client_id

    def get_client_id(self):
        return self.client_id

    def check_client_secret(self, secret: str) -> bool:
        return check_secret(secret, self.cfg.secret_salt, self.cfg.secret_hash, self._key_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.cfg.auth_method == "private_key_jwt":
            return method == "private_key_jwt"
        return method in SECRET_METHODS


def parse_basic(header: str) -> tuple[str, str]:
    """RFC 7617 / RFC 6749 §2.3.1 credentials, strictly: any malformation is
    invalid_client, never an exception further down (Authlib's helper and
    Werkzeug's parser both raise on some inputs)."""
    try:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not token.strip():
            raise ValueError
        decoded = base64.b64decode(token.strip().encode("ascii"), validate=True).decode("utf-8")
        user, sep, password = decoded.partition(":")
        if not sep:
            raise ValueError
        return unquote(user, errors="strict"), unquote(password, errors="strict")
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidClient("Malformed HTTP Basic credentials.") from None


def presented_method(request) -> str:
    """Which one method the request uses; more than one is invalid_request (RFC 6749 §2.3)."""
    form = request.form
    methods = []
    auth = request.headers.get("Authorization")
    if auth:
        if auth.split(" ", 1)[0].lower() != "basic":
            raise InvalidClient("Authenticate the client with HTTP Basic, client_secret_post or private_key_jwt.")
        methods.append("client_secret_basic")
    if "client_secret" in form:
        methods.append("client_secret_post")
    if "client_assertion" in form or "client_assertion_type" in form:
        methods.append("private_key_jwt")
    if len(methods) > 1:
        raise InvalidRequest("Use exactly one client authentication method per request.")
    if not methods:
        raise InvalidClient("Client authentication is required: HTTP Basic, client_secret_post or private_key_jwt.")
    if methods[0] == "private_key_jwt" and form.get("client_assertion_type") != urns.CLIENT_ASSERTION_JWT:
        raise InvalidClient(f"client_assertion_type must be {urns.CLIENT_ASSERTION_JWT}.")
    return methods[0]


def authenticate_secret_basic(query_client, request):
    """client_secret_basic over parse_basic (the header is decoded once, strictly)."""
    client_id, secret = parse_basic(request.headers.get("Authorization", ""))
    client = query_client(client_id)
    if client is not None and client.check_client_secret(secret):
        return client
    return None


def client_lookup(config, key_secret):
    """query_client for Authlib: a registered client from the trust snapshot, or None."""
    def query_client(client_id):
        cfg = config().clients.get(client_id)
        return AuthClient(cfg, key_secret) if cfg is not None else None
    return query_client


class Authenticator:
    def __init__(self, query_client, assertion_method=None):
        self.query_client = query_client
        self._auth = ClientAuthentication(query_client)
        self._auth.register("client_secret_basic", authenticate_secret_basic)
        if assertion_method is not None:
            self._auth.register("private_key_jwt", assertion_method)

    def __call__(self, request):
        method = presented_method(request)
        form_client = request.form.get("client_id")
        try:
            client = self._auth(request, [method], "token")
        except InvalidClientError as e:
            log.info("client authentication failed", extra={"method": method, "reason": e.description})
            raise InvalidClient("Client authentication failed: unknown client, wrong secret or invalid assertion.") from None
        if form_client is not None and form_client != client.client_id:
            raise InvalidClient("The client_id parameter does not match the authenticated client.")
        check_enabled(client)
        return client


def check_enabled(client) -> None:
    """`client disable`: refused at every endpoint, after authentication (and by `explain`)."""
    if client.cfg.disabled:
        raise InvalidClient("The client is disabled; ask an administrator.", detail="client is disabled")


def presented_client_id(request) -> str | None:
    """The client id a request claims (HTTP Basic's user, else client_id), for the log
    of a failed authentication; None when it names none readably."""
    header = request.headers.get("Authorization")
    if header:
        try:
            return parse_basic(header)[0]
        except InvalidClient:
            return None
    return request.form.get("client_id")


class ClientJWKS:
    """Clients' registered keys: inline (imported once per registration), or from
    their jwks_uri through a JWKSCache: Cache-Control honoured within bounds, at
    most one fetch per jwks_min_refetch per URI whatever the outcome."""

    def __init__(self, settings, upstream, metrics=None):
        self.remote = JWKSCache(settings, upstream, metrics)
        self._inline: dict = {}  # client_id -> (the registration's jwks dict, [Key])

    def keys(self, cfg, kid: str | None) -> list:
        if cfg.jwks:
            hit = self._inline.get(cfg.client_id)
            if hit is None or hit[0] is not cfg.jwks:
                try:
                    hit = (cfg.jwks, import_keys(cfg.jwks))
                except ValueError:
                    hit = (cfg.jwks, [])
                self._inline[cfg.client_id] = hit
            return hit[1]
        if not cfg.jwks_uri:
            raise InvalidClientError(description="The client has no registered keys.")
        try:
            return self.remote.keys(cfg.jwks_uri, kid)
        except IssuerUnavailable:
            raise InvalidClientError(description="The client's JWKS could not be fetched.") from None


class PrivateKeyJWT(JWTBearerClientAssertion):
    """RFC 7523 §2.2 client assertions, as SMART Backend Services profiles them:
    iss = sub = client_id, aud = the token endpoint (or this issuer), exp at most
    five minutes ahead, jti never twice while unexpired, kid selecting exactly one
    registered key, jku only when it equals the registered JWKS URL.

    Cheap checks first: the assertion is decoded once (bounded, jose.parse), and
    its structure, iss/sub (a registered private_key_jwt client), aud and exp must
    pass before the client's keys are looked up, so junk assertions never make
    the service fetch a vendor's JWKS. The signature is verified with PyJWT's
    algorithms (as for subject tokens), then Authlib's claim registry and the jti
    replay check run."""
    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, settings, store, jwks: ClientJWKS):
        super().__init__(validate_jti=True, leeway=jose.CLOCK_LEEWAY)
        self.settings, self.store, self.jwks = settings, store, jwks

    def get_audiences(self):
        return [self.settings.token_endpoint, self.settings.issuer]

    def __call__(self, query_client, request):
        assertion = request.form.get("client_assertion")
        if not assertion:
            raise InvalidClientError(description="client_assertion is required.")
        try:
            parsed = jose.parse(assertion)
        except jose.MalformedToken:
            raise InvalidClientError(description="The client assertion is not a well-formed JWT.") from None
        header, claims = parsed.header, parsed.claims
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in CLIENT_ASSERTION_ALGS:
            raise InvalidClientError(description="Unsupported client assertion algorithm.")
        sub = claims.get("sub")
        if not isinstance(sub, str) or claims.get("iss") != sub:
            raise InvalidClientError(description="The assertion's iss and sub must both be the client_id.")
        client = query_client(sub)
        if client is None or client.cfg.auth_method != "private_key_jwt":
            raise InvalidClientError(description="Unknown client or not registered for private_key_jwt.")
        self._check_audience_and_expiry(claims)
        if "jku" in header and header["jku"] != client.cfg.jwks_uri:
            raise InvalidClientError(description="jku does not equal the registered JWKS URL.")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidClientError(description="The assertion's kid is malformed.")
        keys = self.jwks.keys(client.cfg, kid)  # the first point that may reach the network
        matching = [k for k in keys if k.kid == kid] if kid is not None else keys
        if len(matching) != 1:
            raise InvalidClientError(description="The assertion's kid must select exactly one registered key.")
        key = matching[0]
        if key.alg is not None and key.alg != alg:
            raise InvalidClientError(description="The assertion's alg is not the registered key's.")
        if not jose.verify_signature(parsed, alg, key.jwk.key):
            raise InvalidClientError(description="The client assertion's signature does not verify.")
        request.client = client
        self.verify_claims(claims)  # Authlib: iss, sub, aud, exp, nbf, iat; then the jti
        return self.authenticate_client(client)

    def _check_audience_and_expiry(self, claims):
        """aud names this service; exp present, not passed, at most five minutes ahead."""
        accepted = self.get_audiences()
        if not any(a in accepted for a in jose.audiences(claims)):
            raise InvalidClientError(description="The assertion's aud must be this service's token endpoint.")
        exp, now = claims.get("exp"), time.time()
        if not jose.is_number(exp) or exp <= now - jose.CLOCK_LEEWAY:
            raise InvalidClientError(description="The assertion lacks exp or has expired.")
        if exp > now + ASSERTION_MAX_AHEAD + jose.CLOCK_LEEWAY:
            raise InvalidClientError(description="The assertion's exp is more than five minutes ahead.")

    def validate_jti(self, claims, jti):
        exp = claims.get("exp")
        if not jose.is_number(exp) or exp > time.time() + ASSERTION_MAX_AHEAD + jose.CLOCK_LEEWAY:
            raise InvalidClientError(description="The assertion's exp is more than five minutes ahead.")
        if not isinstance(jti, str) or not jti or len(jti) > 255:
            return False
        return self.store.spend_assertion_jti(claims["sub"], jti, int(exp))
