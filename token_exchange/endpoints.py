"""HTTP. POST /token enters through ``TokenEndpoint``, a plain WSGI handler in front
of the Flask app (the one entry: no request context, routing or response objects on
the hot path); /introspect, /revoke, /jwks, /.well-known/*, /healthz, /readyz and
/metrics are Flask routes. Every error, an ``OAuth2Error`` or anything unexpected,
becomes HTTP in one writer (``error_answer``), and every JSON body is written by one
function (``json_answer``)."""
from __future__ import annotations

import json
import logging
from http import HTTPStatus

from flask import Blueprint, Response, current_app, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import audit, dpop, keys, lifecycle, logs
from .client_auth import CLIENT_ASSERTION_ALGS, presented_client_id
from .errors import OAuth2Error, RequestTooLarge, TemporarilyUnavailable
from .forms import read_form
from .grants import advertised_grant_types
from .metrics import CONTENT_TYPE
from .pipeline import TokenRequest, log_lifecycle

log = logging.getLogger(__name__)
bp = Blueprint("token_exchange", __name__)
# The token endpoint's URL is known to Flask's routing (405 with Allow, OPTIONS) and has
# no view: TokenEndpoint answers every POST before Flask is reached.
bp.add_url_rule("/token", endpoint="token", methods=["POST"])


def _ext():
    return current_app.extensions["token_exchange"]


# -- the one JSON writer and the one error writer --------------------------------------------
def json_answer(status: int, body, headers=()) -> tuple:
    """-> (status, body bytes, headers): Content-Type and Content-Length first."""
    data = json.dumps(body).encode()
    out = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    out += [(k, v) for k, v in headers if k.lower() != "content-type"]
    return status, data, out


def error_answer(exc: BaseException, ext) -> tuple:
    """The one place an error becomes HTTP -> (status, body bytes, headers): a typed
    OAuth2Error as RFC 6749 §5.2 says; the database down as 503 temporarily_unavailable;
    Werkzeug's HTTP errors as JSON; anything else as a 500 that says nothing more."""
    if isinstance(exc, SQLAlchemyError):
        exc = database_unavailable(ext, exc)
    elif isinstance(exc, RequestEntityTooLarge):
        exc = RequestTooLarge("The request body is larger than the limit.")
    if isinstance(exc, OAuth2Error):
        return json_answer(*exc())
    if isinstance(exc, HTTPException):
        body = {"error": "invalid_request" if exc.code in (400, 405) else (exc.name or "error").lower().replace(" ", "_"),
                "error_description": (f"Use {', '.join(exc.valid_methods or ['POST'])} here." if exc.code == 405
                                      else (exc.name or "Error"))}
        headers = [("Cache-Control", "no-store")]
        if exc.code == 405:  # RFC 9110 §15.5.6: a 405 names the methods that are allowed
            headers += [(k, v) for k, v in exc.get_headers() if k.lower() == "allow"]
        return json_answer(exc.code or 500, body, headers)
    log.error("unexpected error", exc_info=exc)
    return json_answer(500, {"error": "server_error", "error_description": "An unexpected error occurred."},
                       [("Cache-Control", "no-store")])


def database_unavailable(ext, exc) -> TemporarilyUnavailable:
    ext.metrics.inc("db_errors")
    log.error("database error", extra={"reason": type(exc).__name__})
    return TemporarilyUnavailable("The database is unreachable; retry shortly.")


def respond(answer: tuple) -> Response:
    """A Flask response from an answer (status, body bytes, headers). Each header is set
    once, the last value winning, as the Flask routes always have (so /introspect and
    /revoke send one WWW-Authenticate where /token sends Authlib's and ours)."""
    status, data, headers = answer
    resp = Response(data, status=status, headers=headers[:2])
    for k, v in headers[2:]:
        resp.headers[k] = v
    return resp


def register_error_handlers(app):
    @app.errorhandler(Exception)
    def _any(exc):
        return respond(error_answer(exc, app.extensions["token_exchange"]))


def register_request_ids(app):
    """Every response carries X-Request-Id; every log line of the request names it."""
    @app.after_request
    def _echo(resp):
        resp.headers["X-Request-Id"] = logs.current_request_id()
        return resp


# -- POST /token ---------------------------------------------------------------------------------
class TokenEndpoint:
    """POST /token as a plain WSGI handler in front of the Flask app: every exchange
    passes here, so it runs without Flask's request context, routing and response
    objects (the same form reading and error writer as the other endpoints, and the
    request id for logs through logs.current_environ). Any other path or method goes
    on to Flask (which answers 405 with Allow for GET /token)."""

    def __init__(self, flask_wsgi_app, ext):
        self.next, self.ext = flask_wsgi_app, ext

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") != "/token" or environ.get("REQUEST_METHOD") != "POST":
            return self.next(environ, start_response)
        reset = logs.current_environ.set(environ)
        try:
            status, body, headers = self.answer(environ)
            headers = [("X-Request-Id", logs.current_request_id())] + headers
        finally:
            logs.current_environ.reset(reset)
        start_response(_STATUS.get(status) or f"{status} {HTTPStatus(status).phrase}", headers)
        return [body]

    def answer(self, environ) -> tuple:
        """-> (status, body bytes, headers) for one token request; never raises. With
        DPoP nonces on, every answer carries a current DPoP-Nonce (RFC 9449 §8)."""
        try:
            answer = json_answer(*self.ext.pipeline(environ, EnvironHeaders(environ)))
        except Exception as exc:  # noqa: BLE001 - every error through the one writer; no traceback to the client
            answer = error_answer(exc, self.ext)
        if self.ext.settings.dpop_nonce:
            answer = with_nonce(answer, self.ext)
        return answer


def with_nonce(answer: tuple, ext) -> tuple:
    """The answer with a current DPoP-Nonce header (none while no key is active or the
    database cannot be read: the answer says what is wrong)."""
    try:
        nonce = ext.nonces.current()
    except SQLAlchemyError:
        nonce = None
    if nonce is None:
        return answer
    status, body, headers = answer
    return status, body, headers + [("DPoP-Nonce", nonce)]


_STATUS = {200: "200 OK", 400: "400 BAD REQUEST", 401: "401 UNAUTHORIZED"}


@bp.post("/introspect")
def introspect_endpoint():
    """RFC 7662 for target FHIR servers."""
    ext = _ext()
    try:
        form = read_form(request.environ, ext.settings.max_body)
        cfg = ext.store.config()
        try:
            target = lifecycle.authenticate_target(request, cfg, ext.settings.key_secret)
        except OAuth2Error as e:
            log_lifecycle("introspect", {"target": lifecycle.presented_name(request)}, e)
            raise
        body = lifecycle.introspect(form, target, cfg, ext.store, ext.settings)
    except OAuth2Error as e:
        return respond(error_answer(e, ext))
    return respond(json_answer(200, body, [("Cache-Control", "no-store")]))


@bp.post("/revoke")
def revoke_endpoint():
    """RFC 7009, by the client the token was issued to: logged once, and audited
    (``revoke``) once the client is known."""
    ext = _ext()
    record = audit.revocation(logs.current_request_id())
    try:
        form = read_form(request.environ, ext.settings.max_body)
        req = TokenRequest(request.method, ext.settings.issuer + "/revoke", request.headers, form)
        try:
            client = ext.authenticator(req)
        except OAuth2Error as e:
            log_lifecycle("revoke", {"client_id": presented_client_id(req)}, e)
            raise
        try:
            lifecycle.revoke(form, client.client_id, ext.store.config(), ext.store, ext.settings, record)
        except OAuth2Error as e:
            record["client_id"] = client.client_id
            audit.refused(record, e)
            ext.store.record_audit(record)
            log_lifecycle("revoke", {"client_id": client.client_id, "jti": record.get("jti")}, e)
            raise
        audit.revoked(record, client.client_id)
        if record.get("jti"):  # a token of ours, now revoked (else nothing was done, RFC 7009 §2.2)
            ext.store.record_audit(record)
        log_lifecycle("revoke", {"client_id": client.client_id, "jti": record.get("jti")}, None)
    except OAuth2Error as e:
        return respond(error_answer(e, ext))
    return respond(json_answer(200, {}, [("Cache-Control", "no-store")]))


@bp.get("/jwks")
def jwks():
    ext = _ext()
    cfg = ext.store.config()
    body = {"keys": keys.published(cfg.key_rows, ext.settings.key_grace)}
    max_age = keys.jwks_max_age(ext.settings.key_grace)
    return respond(json_answer(200, body, [("Cache-Control", f"public, max-age={max_age}")]))


def _grant_types():
    """Token exchange always; the JWT authorization grant only while some trust allows it
    (grants.advertised_grant_types, which names the same in unsupported_grant_type)."""
    return advertised_grant_types(_ext().store.config())


# scopes_supported (RFC 8414 §2; SMART App Launch 2.2 §2.1.2): the scope forms a client may
# ask for here. The service reads SMART resource scopes of the three contexts (scopes.py:
# patient/, user/ and system/, v2 letters or the v1 read/write/*, any resource type, with
# ?params) and grants what the subject token and the client's trust both allow; these are
# the widest of those forms. openid, fhirUser, launch/* and offline_access are never passed
# on, so they are not listed.
SCOPES_SUPPORTED = ["patient/*.cruds", "user/*.cruds", "system/*.cruds"]


def _metadata():
    s = _ext().settings
    base = s.issuer
    return {
        "issuer": base,
        "token_endpoint": s.token_endpoint,
        "jwks_uri": base + "/jwks",
        "introspection_endpoint": base + "/introspect",
        "revocation_endpoint": base + "/revoke",
        "grant_types_supported": _grant_types(),
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(CLIENT_ASSERTION_ALGS),
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "revocation_endpoint_auth_signing_alg_values_supported": list(CLIENT_ASSERTION_ALGS),
        "response_types_supported": [],
        "scopes_supported": SCOPES_SUPPORTED,
        "dpop_signing_alg_values_supported": list(dpop.ALGS),  # RFC 9449 §5.1
    }


@bp.get("/.well-known/oauth-authorization-server")
def oauth_metadata():
    return respond(json_answer(200, _metadata(), [("Cache-Control", "public, max-age=300")]))


@bp.get("/.well-known/smart-configuration")
def smart_configuration():
    meta = _metadata()
    caps = ["token-exchange-accesstoken", "client-confidential-symmetric", "client-confidential-asymmetric"]
    if _ext().store.config().any_id_token_trust:
        caps.append("token-exchange-openid")
    body = {k: meta[k] for k in ("issuer", "token_endpoint", "jwks_uri", "introspection_endpoint",
                                  "revocation_endpoint", "grant_types_supported",
                                  "token_endpoint_auth_methods_supported",
                                  "token_endpoint_auth_signing_alg_values_supported",
                                  "dpop_signing_alg_values_supported")}
    # SMART 2.2 requires code_challenge_methods_supported with S256 (PKCE); this service has no
    # authorization endpoint, and its consent sign-in at an EHR uses S256.
    body.update(capabilities=caps, scopes_supported=SCOPES_SUPPORTED, response_types_supported=[],
                code_challenge_methods_supported=["S256"])
    return respond(json_answer(200, body, [("Cache-Control", "public, max-age=60")]))


@bp.get("/healthz")
def healthz():
    return respond(json_answer(200, {"status": "ok"}))


@bp.get("/readyz")
def readyz():
    try:
        _ext().store.ping()
    except SQLAlchemyError:
        return respond(json_answer(503, {"status": "unavailable", "reason": "database unreachable"},
                                   [("Retry-After", "5")]))
    if _ext().store.config().unsealable:
        return respond(json_answer(503, {"status": "unavailable", "reason": "stored keys or secrets cannot be "
                                         "unsealed with TOKEN_EXCHANGE_KEY_SECRET"}, [("Retry-After", "5")]))
    return respond(json_answer(200, {"status": "ready"}))


@bp.get("/metrics")
def metrics():
    ext = _ext()
    if not ext.settings.metrics:
        return respond(json_answer(404, {"error": "not_found"}))
    return Response(ext.metrics.render(), content_type=CONTENT_TYPE)
