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

from . import logs
from .client_auth import AuthClient, Authenticator
from .errors import InvalidRequest, OAuth2Error, TemporarilyUnavailable, UnsupportedGrantType
from .grant import TokenExchangeGrant
from .jwt_grant import JWTAuthorizationGrant
from .logs import current_request_id
from .matching import PatientMapper

log = logging.getLogger(__name__)
decision_log = logging.getLogger("token_exchange.decision")
GRANTS = (TokenExchangeGrant, JWTAuthorizationGrant)
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
    def __init__(self, settings, store, validator, assertion_method=None, metrics=None, patients=None,
                 consent=None):
        super().__init__()
        self.settings, self.store, self.validator, self.metrics = settings, store, validator, metrics
        self.patients = patients or PatientMapper(store)
        self.consent = consent
        self.authenticator = Authenticator(self.query_client, assertion_method)
        self.grants = {g.GRANT_TYPE: g for g in GRANTS}
        for g in GRANTS:
            self.register_grant(g)
        self._rate_lock = threading.Lock()
        self._rate_window, self._rate_counts = None, {}

    def query_client(self, client_id):
        cfg = self.store.config().clients.get(client_id)
        return AuthClient(cfg, self.settings.key_secret) if cfg is not None else None

    def send_signal(self, name, *args, **kwargs):
        pass

    def handle_response(self, status, body, headers):
        return status, body, headers

    def grant_class(self, form):
        """RFC 6749 §5.2: the grant type, once, and one this server supports."""
        if len(form.getlist("grant_type")) > 1:
            raise InvalidRequest("The grant_type parameter appears more than once.")
        grant_type = form.get("grant_type")
        if not grant_type:
            raise InvalidRequest("The grant_type parameter is required.")
        grant = self.grants.get(grant_type)
        if grant is None:
            raise UnsupportedGrantType("Supported grant types here: " + ", ".join(self.grants) + ".")
        return grant

    def create_token_response(self, request: TokenRequest):
        """-> (status, body, headers). Errors before client authentication go to the
        log and the metrics; every decision for an authenticated client is audited
        and committed before the response. Every decision is one log line."""
        form = request.form
        audit = request.audit
        audit["request_id"] = current_request_id()
        for name in AUTH_PARAMS:
            if len(form.getlist(name)) > 1:
                return self._refused(request, InvalidRequest(f"The {name} parameter appears more than once."))
        try:
            request.client = self.authenticator(request)
        except OAuth2Error as e:
            return self._refused(request, e)
        audit["client_id"] = request.client.client_id
        try:
            self._rate_limit(request.client.client_id)
            grant = self.grant_class(form)(request, self)
            grant.validate_token_request()
            result = grant.create_token_response()
        except OAuth2Error as e:
            audit["error"] = e.error
            audit["reason"] = _clip(getattr(e, "detail", None) or e.description, 1000)
            self.store.record_audit(audit)
            return self._refused(request, e)
        self.store.record_audit(audit)
        self._count("granted", None)
        log_decision(audit, None)
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

    def _refused(self, request, error):
        self._count("refused", error.error)
        log_decision(request.audit, error)
        return self.handle_error_response(request, error)

    def _count(self, outcome, error):
        if self.metrics is not None:
            self.metrics.exchange(outcome, error)


def log_decision(audit: dict, error) -> None:
    """One structured line per decision: ids, issuer, target, the error code and the
    internal reason; never a token or a secret (the audit dict holds none)."""
    if error is None:
        logs.info_line(decision_log, "granted", {k: audit.get(k) for k in _GRANTED_FIELDS})
    else:
        fields = {k: audit.get(k) for k in _REFUSED_FIELDS}
        fields["error"] = error.error
        fields["reason"] = getattr(error, "detail", None) or error.description
        logs.info_line(decision_log, "refused", fields)


_GRANTED_FIELDS = ("client_id", "grant", "issuer", "target", "scope_granted", "link", "consent", "jti")
_REFUSED_FIELDS = ("client_id", "grant", "issuer", "target")


def _clip(value, n):
    return value[:n] if isinstance(value, str) else value
