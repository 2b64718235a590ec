"""POST /token as a short pipeline of named steps, after node-oidc-provider's
``lib/actions/token.js``: parse → reject duplicate client-authentication parameters →
authenticate the client → rate limit → grant type → grant (its parameters, then its
rule steps) → record and respond.

Every refusal is counted and logged here, once per request; every decision for an
authenticated client is audited (audit.py builds the record) and committed before
the answer. Refusals leave as raised ``OAuth2Error``s: endpoints.py turns them (and
anything unexpected) into HTTP in its one writer.
"""
from __future__ import annotations

import logging
import threading
import time

from authlib.oauth2.rfc6749.requests import OAuth2Payload, OAuth2Request
from werkzeug.datastructures import MultiDict

from . import audit, logs
from .dpop import replayed
from .errors import InvalidRequest, OAuth2Error, TemporarilyUnavailable, UnsupportedGrantType
from .forms import read_form, reject_duplicates
from .grants import GRANTS, advertised_grant_types

decision_log = logging.getLogger("token_exchange.decision")
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
        self.dpop_jkt = None  # the DPoP proof's key thumbprint, once the proof is checked
        self.dpop = None  # the checked dpop.Proof
        self._body = None
        self._form = form
        self.payload = _FormPayload(form)
        self.client = self.auth_method = self.user = None
        self.authorization_code = self.refresh_token = self.credential = None
        self._scope = None

    @property
    def form(self):
        return self._form

    @property
    def args(self):
        return MultiDict()


class TokenPipeline:
    """The token endpoint's steps, with what they need handed in (create_app)."""

    def __init__(self, settings, store, authenticator, deps, metrics, proofs):
        self.settings, self.store, self.authenticator = settings, store, authenticator
        self.proofs = proofs  # dpop.ProofChecker
        self.deps, self.metrics = deps, metrics
        self.grants = {g.GRANT_TYPE: g for g in GRANTS}
        self._rate_lock = threading.Lock()
        self._rate_window, self._rate_counts = None, {}

    def __call__(self, environ, headers) -> tuple:
        """-> (status, body dict, headers) for a granted request; a refusal raises its
        OAuth2Error, counted and (from client authentication on) logged and audited.
        The duration is observed for every request whose form was read and decided."""
        started = time.perf_counter()
        try:
            form = read_form(environ, self.settings.max_body)  # a refusal here is counted, not logged
        except OAuth2Error as e:
            self.metrics.exchange("refused", e.error)
            raise
        try:
            answer = self.decide(TokenRequest("POST", self.settings.token_endpoint, headers, form))
        except OAuth2Error:
            self.metrics.observe(time.perf_counter() - started)
            raise
        self.metrics.observe(time.perf_counter() - started)
        return answer

    def decide(self, request: TokenRequest) -> tuple:
        form = request.form
        record = audit.exchange(logs.current_request_id())
        try:
            reject_duplicates(form, AUTH_PARAMS)
            request.client = self.authenticator(request)
        except OAuth2Error as e:
            self._refused(record, e)
            raise
        record["client_id"] = request.client.client_id
        try:
            self._rate_limit(request.client.client_id)
            self.check_dpop(request, record)
            grant = self.grant_class(form)(request, self.deps, record)
            grant.validate_token_request()
            minting = grant.decide_token()
        except OAuth2Error as e:
            raise self._refuse(request, record, e)
        recording = self.store.send_audit(record)  # committed while the token is signed, before the answer
        try:
            answer = minting.sign()
        finally:
            recorded = recording.committed()
        if not recorded:  # the proof's jti was spent (RFC 9449 §4.3 (12)): nothing issued
            raise self._refuse(request, dict(record, jti=None, scope_granted=None, outcome="refused", dpop_jti=None),
                               replayed())
        self._count_user(record)
        self.metrics.exchange("granted", None)
        self.metrics.token_type("DPoP" if request.dpop_jkt else "Bearer")
        log_decision(record, None)
        return answer

    def _refuse(self, request, record, error) -> OAuth2Error:
        """A refusal of an authenticated client's request: audited (committed before the
        answer; a checked proof's jti spent with it, single use whatever the outcome),
        counted and logged. -> the error to answer: ``error``, or invalid_dpop_proof when
        the record finds the proof spent already (a replayed proof is refused as one,
        whatever else was wrong with the request, as when it is checked first)."""
        audit.refused(record, error)
        if not self.store.record_audit(record):
            error = replayed()
            record["dpop_jti"] = None
            audit.refused(record, error)
            self.store.record_audit(record)
        self._count_user(record)
        self._refused(record, error)
        return error

    def check_dpop(self, request: TokenRequest, record: dict) -> None:
        """RFC 9449 §4.3, right after client authentication (and its rate limit): the one
        DPoP header's proof, when sent (dpop.ProofChecker); required by the client
        (--require-dpop, RFC 9449 §5.2). A trust's --require-dpop and bound tokens are
        the grant's, once it knows them. Without the header: nothing more to do."""
        header = request.headers.get("DPoP")
        if header is None:
            if request.client.cfg.require_dpop:
                raise InvalidRequest("A DPoP proof is required for this client (RFC 9449): send a DPoP header.",
                                     detail="no DPoP proof; the client requires DPoP")
            return
        request.dpop = self.proofs.check(header)
        request.dpop_jkt = record["dpop_jkt"] = request.dpop.jkt
        record["dpop_jti"] = request.dpop.jti

    def grant_class(self, form):
        """RFC 6749 §5.2: the grant type, once, and one this server supports."""
        reject_duplicates(form, ("grant_type",))
        grant_type = form.get("grant_type")
        if not grant_type:
            raise InvalidRequest("The grant_type parameter is required.")
        grant = self.grants.get(grant_type)
        if grant is None:
            # The ones discovery lists (a grant no trust allows is not named).
            raise UnsupportedGrantType("Supported grant types here: "
                                       + ", ".join(advertised_grant_types(self.deps.config())) + ".")
        return grant

    def dry_run(self, grant_cls, client, form, trace: list):
        """The grant for a named, unauthenticated client, to run its steps with a trace
        and nothing written, searched or spent (`token-exchange explain`)."""
        request = TokenRequest("POST", self.settings.token_endpoint, {}, form)
        request.client = client
        return grant_cls(request, self.deps, audit.exchange(None), trace=trace, dry_run=True)

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

    def _count_user(self, record):
        """The user step's outcome at a `mapped` target, when user/ scopes were at stake."""
        outcome = record.get("user_link")
        if outcome is not None:
            self.metrics.user_mapping(outcome)

    def _refused(self, record, error):
        self.metrics.exchange("refused", error.error)
        log_decision(record, error)


def log_decision(record: dict, error) -> None:
    """One structured line per decision: ids, issuer, target, the error code and the
    internal reason; never a token or a secret (the audit record holds none)."""
    if error is None:
        logs.info_line(decision_log, "granted", {k: record.get(k) for k in _GRANTED_FIELDS})
    else:
        fields = {k: record.get(k) for k in _REFUSED_FIELDS}
        fields["error"] = error.error
        fields["reason"] = getattr(error, "detail", None) or error.description
        logs.info_line(decision_log, "refused", fields)


def log_lifecycle(endpoint: str, fields: dict, error) -> None:
    """/introspect and /revoke: one decision line for a revocation (``revoked``; a null
    jti: the token was not one to revoke, RFC 7009 §2.2) and for a refused request
    there (``refused``: failed client or target authentication, another client's
    token), naming the endpoint, the client or target and the error's internal reason."""
    fields = dict(fields, endpoint=endpoint)
    if error is None:
        logs.info_line(decision_log, "revoked", fields)
    else:
        fields["error"] = error.error
        fields["reason"] = getattr(error, "detail", None) or error.description
        logs.info_line(decision_log, "refused", fields)


_GRANTED_FIELDS = ("client_id", "grant", "issuer", "target", "scope_granted", "link", "user_link", "consent", "jti",
                   "dpop_jkt")
_REFUSED_FIELDS = ("client_id", "grant", "issuer", "target", "dpop_jkt")
