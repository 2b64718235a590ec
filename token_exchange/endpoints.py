"""HTTP: /token /jwks /.well-known/* /healthz /readyz /metrics (and /introspect, /revoke)."""
from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from urllib.parse import parse_qsl

from flask import Blueprint, Response, current_app, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.datastructures import EnvironHeaders, MultiDict
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.wsgi import get_content_length, get_input_stream

from . import keys, lifecycle, logs, urns
from .errors import InvalidRequest, OAuth2Error, RequestTooLarge, TemporarilyUnavailable
from .metrics import CONTENT_TYPE
from .server import TokenRequest

log = logging.getLogger(__name__)
bp = Blueprint("token_exchange", __name__)
FORM = "application/x-www-form-urlencoded"


def _ext():
    return current_app.extensions["token_exchange"]


def json_response(status, body, headers=()):
    resp = Response(json.dumps(body), status=status, mimetype="application/json")
    for k, v in headers:
        if k.lower() != "content-type":
            resp.headers[k] = v
    return resp


def oauth_error_response(error: OAuth2Error):
    """The one place a typed error becomes HTTP (RFC 6749 §5.2)."""
    status, body, headers = error()
    return json_response(status, body, headers)


def read_form(environ=None, max_body: int | None = None) -> MultiDict:
    """The request body as a form, strictly: size first, form-encoded POST only,
    no parameters in the query string (RFC 6749 §3.2). Read from the WSGI environ,
    so the token endpoint (served without Flask's request context) and the other
    endpoints share it."""
    if environ is None:
        environ, max_body = request.environ, _ext().settings.max_body

    def too_large():
        return RequestTooLarge(f"The request body is larger than {max_body // 1024} KiB.")
    length = get_content_length(environ)
    if length is None:
        # No Content-Length (chunked): read at most the limit + 1 byte, never more. The raw
        # input, because Werkzeug's limited stream stops silently at the limit.
        body = environ["wsgi.input"].read(max_body + 1) if environ.get("wsgi.input_terminated") else b""
        if len(body) > max_body:
            raise too_large()
    elif length > max_body:
        raise too_large()
    if parse_options_header(environ.get("CONTENT_TYPE", ""))[0] != FORM:
        raise InvalidRequest(f"Send the request as {FORM}.")
    if environ.get("QUERY_STRING"):
        raise InvalidRequest("Send parameters in the form body, not in the query string.")
    if length is not None:
        try:
            body = get_input_stream(environ).read()  # at most Content-Length bytes
        except HTTPException:  # Werkzeug's ClientDisconnected: the body ended early
            body = b""
        if len(body) < length:
            raise InvalidRequest("The request body is shorter than its Content-Length.")
    return parse_form(body)


def parse_form(body: bytes) -> MultiDict:
    """application/x-www-form-urlencoded -> MultiDict, the same parse Werkzeug's form
    parser runs (urllib's parse_qsl), without its stream and parser objects, and strict
    where Werkzeug is silent: a body that is not UTF-8 is refused, not read as empty."""
    try:
        return MultiDict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict"))
    except UnicodeDecodeError:
        raise InvalidRequest("The form body is not UTF-8; percent-encode parameters as UTF-8.") from None


@bp.post("/token")
def token():
    """POST /token when TokenEndpoint does not stand in front of the app (create_app
    puts it there): the same answer, through Flask."""
    status, body, headers = TokenEndpoint(None, _ext()).answer(request.environ)
    return Response(body, status=status, headers=headers)


class TokenEndpoint:
    """POST /token as a plain WSGI handler in front of the Flask app: every exchange
    passes here, so it runs without Flask's request context, routing and response
    objects (the same form reading, server, errors and headers as the other
    endpoints, and the request id for logs through logs.current_environ). Any other
    path or method goes on to Flask (which answers 405 with Allow for GET /token)."""

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

    def answer(self, environ):
        """-> (status, body bytes, headers) for one token request; never raises."""
        ext = self.ext
        started = time.perf_counter()
        try:
            try:
                form = read_form(environ, ext.settings.max_body)
            except OAuth2Error as e:
                ext.metrics.exchange("refused", e.error)
                return _json(*e())
            req = TokenRequest("POST", ext.settings.token_endpoint, EnvironHeaders(environ), form)
            status, body, headers = ext.server.create_token_response(req)
            ext.metrics.observe(time.perf_counter() - started)
            return _json(status, body, headers)
        except SQLAlchemyError as exc:
            return _json(*database_unavailable(ext, exc)())
        except Exception:  # noqa: BLE001 - no input yields a traceback to the client
            log.exception("unexpected error")
            return _json(500, {"error": "server_error", "error_description": "An unexpected error occurred."},
                         [("Cache-Control", "no-store")])


_STATUS = {200: "200 OK", 400: "400 BAD REQUEST", 401: "401 UNAUTHORIZED"}


def _json(status, body, headers=()):
    data = json.dumps(body).encode()
    out = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    out += [(k, v) for k, v in headers if k.lower() != "content-type"]
    return status, data, out


def database_unavailable(ext, exc) -> TemporarilyUnavailable:
    ext.metrics.inc("db_errors")
    log.error("database error", extra={"reason": type(exc).__name__})
    return TemporarilyUnavailable("The database is unreachable; retry shortly.")


@bp.post("/introspect")
def introspect_endpoint():
    """RFC 7662 for target FHIR servers."""
    ext = _ext()
    try:
        form = read_form()
        cfg = ext.store.config()
        target = lifecycle.authenticate_target(request, cfg, ext.settings.key_secret)
        body = lifecycle.introspect(form, target, cfg, ext.store, ext.settings)
    except OAuth2Error as e:
        return oauth_error_response(e)
    resp = json_response(200, body)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.post("/revoke")
def revoke_endpoint():
    """RFC 7009, by the client the token was issued to."""
    ext = _ext()
    try:
        form = read_form()
        req = TokenRequest(request.method, ext.settings.issuer + "/revoke", request.headers, form)
        client = ext.server.authenticator(req)
        lifecycle.revoke(form, client.client_id, ext.store.config(), ext.store, ext.settings)
    except OAuth2Error as e:
        return oauth_error_response(e)
    resp = json_response(200, {})
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/jwks")
def jwks():
    ext = _ext()
    cfg = ext.store.config()
    body = {"keys": keys.published(cfg.key_rows, ext.settings.key_grace)}
    resp = json_response(200, body)
    # Short enough that a rotation reaches verifiers well inside the grace period.
    resp.headers["Cache-Control"] = f"public, max-age={min(300, max(1, ext.settings.key_grace // 4))}"
    return resp


def _grant_types():
    """Token exchange always; the JWT authorization grant only while some trust allows it."""
    grants = [urns.TOKEN_EXCHANGE]
    if _ext().store.config().any_jwt_grant_trust:
        grants.append(urns.JWT_BEARER)
    return grants


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
        "token_endpoint_auth_signing_alg_values_supported": list(urns.CLIENT_ASSERTION_ALGS),
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "revocation_endpoint_auth_signing_alg_values_supported": list(urns.CLIENT_ASSERTION_ALGS),
        "response_types_supported": [],
        "scopes_supported": [],
    }


@bp.get("/.well-known/oauth-authorization-server")
def oauth_metadata():
    resp = json_response(200, _metadata())
    resp.headers["Cache-Control"] = "public, max-age=300"
    return resp


@bp.get("/.well-known/smart-configuration")
def smart_configuration():
    meta = _metadata()
    caps = ["token-exchange-accesstoken", "client-confidential-symmetric", "client-confidential-asymmetric"]
    if _ext().store.config().any_id_token_trust:
        caps.append("token-exchange-openid")
    body = {k: meta[k] for k in ("issuer", "token_endpoint", "jwks_uri", "introspection_endpoint",
                                  "revocation_endpoint", "grant_types_supported",
                                  "token_endpoint_auth_methods_supported",
                                  "token_endpoint_auth_signing_alg_values_supported")}
    body.update(capabilities=caps, scopes_supported=[], response_types_supported=[])
    resp = json_response(200, body)
    resp.headers["Cache-Control"] = "public, max-age=60"
    return resp


@bp.get("/healthz")
def healthz():
    return json_response(200, {"status": "ok"})


@bp.get("/readyz")
def readyz():
    try:
        _ext().store.ping()
    except SQLAlchemyError:
        return json_response(503, {"status": "unavailable", "reason": "database unreachable"},
                             [("Retry-After", "5")])
    return json_response(200, {"status": "ready"})


@bp.get("/metrics")
def metrics():
    ext = _ext()
    if not ext.settings.metrics:
        return json_response(404, {"error": "not_found"})
    return Response(ext.metrics.render(), content_type=CONTENT_TYPE)


def register_request_ids(app):
    """Every response carries X-Request-Id; every log line of the request names it."""
    from .logs import current_request_id

    @app.after_request
    def _echo(resp):
        resp.headers["X-Request-Id"] = current_request_id()
        return resp


def register_error_handlers(app):
    @app.errorhandler(SQLAlchemyError)
    def _db_down(exc):
        return oauth_error_response(database_unavailable(app.extensions["token_exchange"], exc))

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc):
        return oauth_error_response(RequestTooLarge("The request body is larger than the limit."))

    @app.errorhandler(HTTPException)
    def _http(exc):
        body = {"error": "invalid_request" if exc.code in (400, 405) else (exc.name or "error").lower().replace(" ", "_"),
                "error_description": (f"Use {', '.join(exc.valid_methods or ['POST'])} here." if exc.code == 405
                                      else (exc.name or "Error"))}
        headers = [("Cache-Control", "no-store")]
        if exc.code == 405:  # RFC 9110 §15.5.6: a 405 names the methods that are allowed
            headers += [(k, v) for k, v in exc.get_headers() if k.lower() == "allow"]
        return json_response(exc.code or 500, body, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc):
        log.exception("unexpected error")
        return json_response(500, {"error": "server_error", "error_description": "An unexpected error occurred."},
                             [("Cache-Control", "no-store")])
