"""The authorization server: Authlib's AuthorizationServer with our grant,
client authentication, store and validators wired in.

The token endpoint is a short pipeline (contract check order): size ->
form -> client authentication -> grant type -> grant (parameters, target,
tokens, trust, upstream client, scopes, patient) -> audit -> response.
"""
from __future__ import annotations

import logging
import threading
import time

from authlib.oauth2.rfc6749 import AuthorizationServer
from authlib.oauth2.rfc6749.requests import OAuth2Payload, OAuth2Request
from werkzeug.datastructures import MultiDict

from . import urns
from .client_auth import AuthClient, Authenticator
from .errors import InvalidRequest, OAuth2Error, TemporarilyUnavailable, UnsupportedGrantType
from .grant import TokenExchangeGrant

log = logging.getLogger(__name__)
AUTH_PARAMS = ("client_id", "client_secret", "client_assertion", "client_assertion_type")


class _FormPayload(OAuth2Payload):
    def __init__(self, form: MultiDict):
        self._form = form

    @property
    def data(self):
        return self._form

    @property
    def datalist(self):
        return {k: self._form.getlist(k) for k in self._form}


class TokenRequest(OAuth2Request):
    """An OAuth2Request over a form body parsed once. Transport security is the
    deployment's (TLS at the proxy, see docs/OPERATIONS.md), so Authlib's
    http-URL check is not applied to the internal URL."""

    def __init__(self, method, uri, headers, form: MultiDict):  # super().__init__ skipped on purpose (above)
        self.method, self.uri, self.headers = method, uri, headers
        self._body = None
        self._form = form
        self.payload = _FormPayload(form)
        self.client = self.auth_method = self.user = None
        self.authorization_code = self.refresh_token = self.credential = None
        self._scope = None
        self.audit = {"outcome": "refused"}

    @property
    def form(self):
        return self._form

    @property
    def args(self):
        return MultiDict()


class TokenExchangeServer(AuthorizationServer):
    def __init__(self, settings, store, validator, assertion_method=None, metrics=None):
        super().__init__()
        self.settings, self.store, self.validator, self.metrics = settings, store, validator, metrics
        self.authenticator = Authenticator(self.query_client, assertion_method)
        self.register_grant(TokenExchangeGrant)
        self._rate_lock = threading.Lock()
        self._rate_window, self._rate_counts = None, {}

    def query_client(self, client_id):
        cfg = self.store.config().clients.get(client_id)
        return AuthClient(cfg, self.settings.key_secret) if cfg is not None else None

    def send_signal(self, name, *args, **kwargs):
        pass

    def handle_response(self, status, body, headers):
        return status, body, headers

    def create_token_response(self, request: TokenRequest):
        """-> (status, body, headers). Errors before client authentication go to the
        log and the metrics; every decision for an authenticated client is audited
        and committed before the response."""
        form = request.form
        for name in AUTH_PARAMS:
            if len(form.getlist(name)) > 1:
                return self._error(request, InvalidRequest(f"The {name} parameter appears more than once."))
        try:
            request.client = self.authenticator(request)
        except OAuth2Error as e:
            return self._error(request, e)
        request.audit["client_id"] = request.client.client_id
        try:
            self._rate_limit(request.client.client_id)
            if len(form.getlist("grant_type")) > 1:
                raise InvalidRequest("The grant_type parameter appears more than once.")
            grant_type = form.get("grant_type")
            if not grant_type:
                raise InvalidRequest("The grant_type parameter is required.")
            if grant_type != urns.TOKEN_EXCHANGE:
                raise UnsupportedGrantType(f"Only {urns.TOKEN_EXCHANGE} is supported here.")
            grant = TokenExchangeGrant(request, self)
            grant.validate_token_request()
            result = grant.create_token_response()
        except OAuth2Error as e:
            request.audit["error"] = e.error
            self.store.record_audit(request.audit)
            return self._error(request, e)
        self.store.record_audit(request.audit)
        self._count("granted", None)
        return result

    def _rate_limit(self, client_id):
        """Per-client exchanges per minute (TOKEN_EXCHANGE_RATE_LIMIT; 0 = off), a fixed
        one-minute window: counted in Redis across instances when configured, else
        per worker process."""
        limit = self.settings.rate_limit
        if not limit:
            return
        now = time.time()
        window = int(now // 60)
        with self._rate_lock:  # always counted here too, so losing Redis loses no count
            if self._rate_window != window:
                self._rate_window, self._rate_counts = window, {}
            n = self._rate_counts.get(client_id, 0) + 1
            self._rate_counts[client_id] = n
        accel = self.store.accel
        shared = accel.incr_window(client_id) if accel is not None else None  # every instance's count
        n = max(n, shared or 0)
        if n > limit:
            raise TemporarilyUnavailable("Too many exchanges for this client; retry after the indicated delay.",
                                         status_code=429, retry_after=max(1, int(60 - now % 60)))

    def _error(self, request, error):
        self._count("refused", error.error)
        if getattr(error, "detail", None):
            log.info("token request refused", extra={"error": error.error, "detail": error.detail})
        return self.handle_error_response(request, error)

    def _count(self, outcome, error):
        if self.metrics is not None:
            self.metrics.exchange(outcome, error)
