"""Client authentication at the token endpoint, on Authlib's ClientAuthentication.

Methods: client_secret_basic, client_secret_post (RFC 6749 §2.3.1) and
private_key_jwt (RFC 7523 §2.2 as SMART Backend Services profiles it).
"""
from __future__ import annotations

import logging

from authlib.oauth2.rfc6749.authenticate_client import ClientAuthentication

from . import urns
from .errors import InvalidClient, InvalidClientError, InvalidRequest
from .sealing import check_secret

log = logging.getLogger(__name__)
SECRET_METHODS = ("client_secret_basic", "client_secret_post")


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

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == urns.TOKEN_EXCHANGE


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


class Authenticator:
    def __init__(self, query_client, assertion_method=None):
        self._auth = ClientAuthentication(query_client)
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
        return client
