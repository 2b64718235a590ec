"""The consent pages (contract, "Consent for patient-facing apps", flow steps 2-5,
and withdrawal at /consent).

Server-rendered, no JavaScript, no third-party assets. Every POST carries a CSRF
token: before sign-in a double-submit cookie (a GET stores nothing on the
server), after it the token kept with the server-side session. Until the EHR
answers nothing of a browser is stored: a sign-in's state (OIDC state, nonce,
PKCE verifier, the ticket and the app's return) travels sealed in the flow's
cookie (``state.py``); a ticket is bound to the SHA-256 of that cookie. At the
callback, once the EHR's answer is verified, the cookie is replaced by a random
one naming the session (``browser_session``, under its SHA-256), so any
instance can serve any step.
"""
from __future__ import annotations

import hmac
import logging
import secrets
import time
from datetime import datetime, timezone

from authlib.common.urls import add_params_to_uri
from flask import Blueprint, current_app, g, redirect, render_template, request, url_for
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from .. import audit
from ..logs import current_request_id
from . import words
from .service import TICKET_PATH, WrongSigner, check_signer, digest
from .signin import SignInError, web_origin
from .state import MAX_COOKIE, SIGNIN_TTL, SignInStates

log = logging.getLogger(__name__)
bp = Blueprint("consent", __name__, url_prefix="/consent", template_folder="templates",
               static_folder="static", static_url_path="/static")

FLOW_COOKIE, MANAGE_COOKIE, CSRF_COOKIE = "te_consent", "te_consent_manage", "te_csrf"
MANAGE_TTL = 900  # seconds a sign-in at /consent lasts
DURATIONS = (1, 7, 30)  # days offered, with the trust's maximum
MAX_STATE = 512


class Page(Exception):
    """An error page: a 4xx/5xx status, a title and what the person can do."""

    def __init__(self, status: int, title: str, message: str, detail: str = ""):
        super().__init__(title)
        self.status, self.title, self.message, self.detail = status, title, message, detail


def _ext():
    return current_app.extensions["token_exchange"]


def _records():
    return _ext().store.consents


def _service():
    return _ext().consent


def _signin():
    return _service().signin


def _states() -> SignInStates:
    return _service().states


def _count(event):
    _ext().metrics.inc(event)


def _secure() -> bool:
    return _ext().settings.issuer.startswith("https://")


def _cookie_name(name: str) -> str:
    # RFC 6265bis __Host- prefix: Secure, Path=/, no Domain: no other host can set it.
    return f"__Host-{name}" if _secure() else name


def _set_cookie(resp, name, value, max_age):
    resp.set_cookie(_cookie_name(name), value, max_age=max_age, path="/", secure=_secure(), httponly=True,
                    samesite="Lax")


def _clear_cookie(resp, name):
    resp.delete_cookie(_cookie_name(name), path="/", secure=_secure(), httponly=True, samesite="Lax")


def _cookie(name, limit=128):
    """A cookie's value: a session's random key (at most 128 characters), or with
    limit=MAX_COOKIE a flow cookie that may be a sealed sign-in."""
    value = request.cookies.get(_cookie_name(name))
    return value if value and len(value) <= limit else None


def _allow_form_action(url: str | None):
    """CSP form-action must also allow where a form's answer redirects the browser: its
    validated origin, never the URL's own text."""
    origin = web_origin(url)
    if origin:
        g.setdefault("form_action", []).append(origin)


def _same(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and bool(a) and hmac.compare_digest(a.encode(), b.encode())


# -- headers, errors ---------------------------------------------------------------
@bp.after_request
def _headers(resp):
    extra = " ".join(dict.fromkeys(g.get("form_action", [])))
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; "
        f"form-action 'self'{' ' + extra if extra else ''}; frame-ancestors 'none'")
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    return resp


def _error_page(status, title, message):
    return render_template("consent/error.html", title=title, message=message), status


@bp.errorhandler(Page)
def _page(e: Page):
    if request.endpoint == "consent.callback":  # a callback refused, counted
        _count("consent_signin_refusals")
    if e.detail:
        log.info("consent page refused", extra={"status": e.status, "reason": e.detail})
    return _error_page(e.status, e.title, e.message)


@bp.errorhandler(SQLAlchemyError)
def _db_down(e):
    log.error("database error", extra={"reason": type(e).__name__})
    resp = current_app.make_response(_error_page(503, "Try again shortly",
                                                 "The service cannot reach its database just now."))
    resp.headers["Retry-After"] = "30"
    return resp


@bp.errorhandler(HTTPException)
def _http(e):
    return _error_page(e.code or 400, e.name or "Error", "The request could not be handled.")


@bp.errorhandler(Exception)
def _unexpected(e):
    log.exception("unexpected error on a consent page")
    return _error_page(500, "Something went wrong", "Nothing was approved. Try again from the app.")


# -- shared steps -------------------------------------------------------------------
_GONE = ("This link can no longer be used", "It was used already or has expired. Go back to the app and try "
                                            "again: it will give you a new link.")
_ELSEWHERE = ("This link is already open in another browser",
              "Finish in the browser where you opened it first, or go back to the app for a new link.")


def _ticket_row(ticket_hash: str, session_hash: str | None = None):
    """An unspent, unexpired ticket (bound to this session, when one is given)."""
    row = _records().ticket(ticket_hash)
    if row is None:
        raise Page(404, "This link is not valid", "Go back to the app and try again: it will give you a new "
                                                  "link.", "unknown ticket")
    if row.spent is not None or row.expires <= time.time():
        raise Page(410, *_GONE, "spent or expired ticket")
    if session_hash is not None and row.session_hash != session_hash:
        raise Page(409, "This approval continues in another browser",
                   "Finish it in the browser where you started it, or go back to the app for a new link.",
                   "ticket bound to another session")
    return row


def _context(row):
    """What the ticket names, from the configuration as it is now."""
    cfg = _ext().store.config()
    client, issuer = cfg.clients.get(row.client_id), cfg.issuers.get(row.issuer)
    target = cfg.targets_by_id.get(row.target_id)
    trust = cfg.trusts.get((row.client_id, row.issuer, row.target_id))
    if client is None or issuer is None or target is None or trust is None or trust.consent != "required":
        raise Page(400, "This app cannot ask for your approval here",
                   "The service is no longer set up for it. Nothing was approved.", "trust gone or changed")
    return cfg, client, issuer, target, trust


def _redirect_uri(client, value):
    """Contract: one of the client's registered redirect URIs, compared exactly."""
    if value is None or value == "":
        return None
    if value not in client.redirect_uris:
        raise Page(400, "The app's return address is not registered",
                   "For your safety this page will not send you there. Nothing was approved; tell the app's "
                   "maker.", "redirect_uri not registered for the client")
    return value


def _app_state(value):
    if value is None or value == "":
        return None
    if len(value) > MAX_STATE or not value.isprintable():
        raise Page(400, "The app's link is malformed", "Go back to the app and try again.", "bad state")
    return value


def _csrf_cookie_token():
    """The double-submit token of pages shown before any server-side session."""
    return _cookie(CSRF_COOKIE) or secrets.token_urlsafe(32)


def _check_csrf_cookie():
    if not _same(request.form.get("csrf"), _cookie(CSRF_COOKIE)):
        raise Page(403, "This form has expired", "Reload the page and try again.", "CSRF check failed (cookie)")


def _session(cookie_name, purpose):
    """(key hash, data) of this browser's signed-in session for `purpose`, or (None, None)."""
    cookie = _cookie(cookie_name)
    if cookie is None:
        return None, None
    key = digest(cookie)
    data = _records().session(key)
    if not data or data.get("purpose") != purpose or "user" not in data:
        return None, None
    return key, data


def _render(template, csrf_cookie=None, **values):
    resp = current_app.make_response(render_template(template, **values))
    if csrf_cookie is not None and csrf_cookie != _cookie(CSRF_COOKIE):
        _set_cookie(resp, CSRF_COOKIE, csrf_cookie, max_age=3600)
    return resp


def _app_name(client):
    return client.name or client.client_id


# -- step 2: the consent_uri ------------------------------------------------------------
@bp.get("/t/<ticket>")
def start(ticket):
    """Stores nothing: a page naming the app, with Continue (a CSRF-checked POST)."""
    row = _ticket_row(digest(ticket))
    cfg, client, issuer, target, trust = _context(row)
    redirect_uri = _redirect_uri(client, request.args.get("redirect_uri"))
    state = _app_state(request.args.get("state"))
    if row.session_hash is not None:
        cookie = _cookie(FLOW_COOKIE, MAX_COOKIE)
        if cookie is None or not _same(digest(cookie), row.session_hash):
            raise Page(409, *_ELSEWHERE, "ticket bound to another browser")
        data = _records().session(row.session_hash)
        if data and "user" in data:  # signed in already: resume at the approval page
            return redirect(url_for(".approve"), 303)
    try:
        _allow_form_action(_signin().endpoints(issuer)[0])
    except SignInError as e:
        raise Page(e.status, "Sign-in is not available", e.message, e.detail) from None
    csrf = _csrf_cookie_token()
    return _render("consent/start.html", csrf_cookie=csrf, csrf=csrf, app=_app_name(client), target=target,
                   redirect_uri=redirect_uri, state=state, action=TICKET_PATH + ticket)


@bp.post("/t/<ticket>")
def begin(ticket):
    """Bind the ticket to this browser and send it to sign in at the EHR. Nothing else is
    stored: the sign-in's state goes sealed in the flow cookie the ticket is bound to."""
    _check_csrf_cookie()
    row = _ticket_row(digest(ticket))
    cfg, client, issuer, target, trust = _context(row)
    redirect_uri = _redirect_uri(client, request.form.get("redirect_uri"))
    state = _app_state(request.form.get("state"))
    try:
        url, pending = _signin().start(issuer, row.source or issuer.sources[0])
        cookie = _states().seal("grant", {"ticket": row.ticket_hash, "redirect_uri": redirect_uri, "state": state,
                                          "signin": pending}, row.expires)
    except SignInError as e:
        raise Page(e.status, "Sign-in is not available", e.message, e.detail) from None
    if row.session_hash is not None:  # reopened in the browser that bound it: resume
        old = _cookie(FLOW_COOKIE, MAX_COOKIE)
        if old is None or not _same(digest(old), row.session_hash) \
                or not _records().rebind(row.ticket_hash, row.session_hash, digest(cookie)):
            raise Page(409, *_ELSEWHERE, "ticket bound to another browser")
    elif not _records().bind(row.ticket_hash, digest(cookie)):
        raise Page(409, *_ELSEWHERE, "ticket bound meanwhile")
    _count("consent_signin_starts")
    _allow_form_action(url)
    resp = redirect(url, 303)
    _set_cookie(resp, FLOW_COOKIE, cookie, max_age=max(1, row.expires - int(time.time())))
    return resp


# -- step 3: back from the EHR ------------------------------------------------------------
@bp.get("/callback")
def callback():
    """The EHR's answer to the sealed sign-in of this browser whose state it names, used
    once; only now, the answer verified, is a session stored."""
    found = _states().find(request.args.get("state"), (("grant", _cookie(FLOW_COOKIE, MAX_COOKIE)),
                                                        ("manage", _cookie(MANAGE_COOKIE, MAX_COOKIE))))
    if found is None:
        raise Page(400, "This sign-in does not belong to this browser",
                   "It may have expired, or been started elsewhere. Go back to the app and try again.",
                   "no sign-in cookie with this state")
    purpose, cookie, data = found
    if _states().spent(data):  # the state is used once, at every instance
        raise Page(400, "This sign-in was already used", "Go back to the app and try again.", "state reused")
    cfg = _ext().store.config()
    issuer = cfg.issuers.get(data["signin"]["issuer"])
    if issuer is None:
        raise Page(400, "This EHR is no longer set up here", "Nothing was approved.", "issuer removed")
    row = _ticket_row(data["ticket"], digest(cookie)) if purpose == "grant" else None
    try:
        claims = _signin().finish(issuer, data["signin"], request.args, cfg.active_key)
    except SignInError as e:
        raise Page(e.status, "The sign-in did not work", e.message, e.detail) from None
    user = {"issuer": issuer.url, "sub": claims["sub"],
            "fhirUser": claims.get("fhirUser") if isinstance(claims.get("fhirUser"), str) else None}
    if row is not None:
        try:
            check_signer(row, user, cfg)
        except WrongSigner as e:
            raise Page(403, *_WRONG_SIGNER[e.who], e.detail) from None
        session = {"purpose": "grant", "ticket": row.ticket_hash, "redirect_uri": data.get("redirect_uri"),
                   "state": data.get("state"), "csrf": secrets.token_urlsafe(32), "user": user}
        name, expires, page = FLOW_COOKIE, row.expires, ".approve"
    else:
        session = {"purpose": "manage", "csrf": secrets.token_urlsafe(32), "user": user}
        name, expires, page = MANAGE_COOKIE, int(time.time()) + MANAGE_TTL, ".manage"
    new_cookie = _states().complete(cookie, data, session, expires, row.ticket_hash if row else None)
    if new_cookie is None:
        if row is not None:  # a ticket spent or taken meanwhile says so
            _ticket_row(data["ticket"], digest(cookie))
        raise Page(400, "This sign-in was already used", "Go back to the app and try again.", "state spent meanwhile")
    _count("consent_sessions_stored")
    resp = redirect(url_for(page), 303)  # the session cookie is rotated at sign-in
    _set_cookie(resp, name, new_cookie, max_age=max(1, expires - int(time.time())))
    return resp


# Who must sign (service.check_signer), in the words of the page that says so.
_WRONG_SIGNER = {
    "user": ("Please sign in as the person using the app",
             "You signed in with another account than the one the app is used with, so nothing was "
             "approved. Sign out at your EHR, go back to the app and sign in as that person."),
    "patient": ("Only the patient can approve this",
                "This app's access must be approved by the patient whose record it is, signed in as "
                "themself. Nothing was approved."),
}


# -- steps 4 and 5: approve or deny ------------------------------------------------------------
def _durations(trust):
    top = trust.consent_max_days
    return [d for d in DURATIONS if d < top] + [top]


def _flow():
    key, data = _session(FLOW_COOKIE, "grant")
    if key is None:
        raise Page(400, "Nothing to approve in this browser",
                   "The approval may have expired or been finished. Go back to the app and try again.",
                   "no signed-in flow session")
    row = _ticket_row(data["ticket"], key)
    return key, data, row


@bp.get("/approve")
def approve():
    key, data, row = _flow()
    cfg, client, issuer, target, trust = _context(row)
    durations = _durations(trust)
    _allow_form_action(data.get("redirect_uri"))  # Allow and Deny end at the app's redirect URI
    return _render("consent/approve.html", app=_app_name(client), client_id=client.client_id, target=target,
                   patient=row.patient, source=row.source, phrases=words.describe(row.scopes),
                   durations=durations, default=30 if 30 in durations else durations[-1], csrf=data["csrf"],
                   user=data["user"], manage_url=_ext().settings.issuer + "/consent")


@bp.post("/approve")
def decide():
    key, data, row = _flow()
    if not _same(request.form.get("csrf"), data.get("csrf")):
        raise Page(403, "This form has expired", "Reload the page and try again.", "CSRF check failed (session)")
    cfg, client, issuer, target, trust = _context(row)
    decision = request.form.get("decision")
    if decision not in ("allow", "deny"):
        raise Page(400, "Choose Allow or Deny", "Go back and choose one of the two buttons.", "no decision")
    days = trust.consent_max_days
    if decision == "allow":
        try:
            days = int(request.form.get("days", ""))
        except ValueError:
            days = None
        if days not in _durations(trust):
            raise Page(400, "Choose how long to allow it", "Go back and choose one of the durations shown.",
                       "bad duration")
    granted = decision == "allow"
    consent_id = _service().decide(row, key, data["user"].get("fhirUser"), granted, days, target.base_url,
                                   current_request_id())
    if consent_id is None:
        raise Page(410, *_GONE, "ticket spent meanwhile")
    _records().claim_session(key)
    log.info("consent " + ("granted" if granted else "denied"),
             extra={"consent": consent_id, "client_id": row.client_id, "target": target.base_url})
    redirect_uri = data.get("redirect_uri")
    if redirect_uri and redirect_uri in client.redirect_uris:
        params = [("consent", "granted" if granted else "denied")]
        if data.get("state"):
            params.append(("state", data["state"]))
        resp = redirect(add_params_to_uri(redirect_uri, params), 303)
    else:
        resp = _render("consent/done.html", granted=granted, app=_app_name(client), target=target, days=days)
    _clear_cookie(resp, FLOW_COOKIE)
    return resp


# -- withdrawal by the user ---------------------------------------------------------------
@bp.get("")
def manage():
    key, data = _session(MANAGE_COOKIE, "manage")
    cfg = _ext().store.config()
    if key is None:
        issuers = [i for i in cfg.issuers.values() if i.login_client_id]
        for i in issuers:
            try:
                _allow_form_action(_signin().endpoints(i)[0])
            except SignInError:
                pass
        csrf = _csrf_cookie_token()
        return _render("consent/signin.html", csrf_cookie=csrf, csrf=csrf, issuers=issuers)
    user = data["user"]
    rows = _records().active_for(user["issuer"], user["sub"], datetime.now(timezone.utc))
    consents = []
    for r in rows:
        c = r.Consent
        client = cfg.clients.get(c.client_id)
        consents.append({"id": c.id, "app": _app_name(client) if client else c.client_id,
                         "target": r.target_name or r.target_url, "target_url": r.target_url,
                         "patient": c.patient, "phrases": words.describe(c.scopes),
                         "expires": c.expires.date().isoformat()})
    return _render("consent/manage.html", consents=consents, csrf=data["csrf"], user=user)


@bp.post("/signin")
def manage_signin():
    _check_csrf_cookie()
    cfg = _ext().store.config()
    issuer = cfg.issuers.get(request.form.get("issuer") or "")
    if issuer is None or not issuer.login_client_id:
        raise Page(400, "Choose where you sign in", "Go back and choose one of the EHRs listed.", "bad issuer")
    try:
        url, pending = _signin().start(issuer, issuer.sources[0])
        cookie = _states().seal("manage", {"signin": pending}, int(time.time()) + SIGNIN_TTL)  # nothing stored
    except SignInError as e:
        raise Page(e.status, "Sign-in is not available", e.message, e.detail) from None
    _count("consent_signin_starts")
    _allow_form_action(url)
    resp = redirect(url, 303)
    _set_cookie(resp, MANAGE_COOKIE, cookie, max_age=SIGNIN_TTL)
    return resp


def _managing():
    key, data = _session(MANAGE_COOKIE, "manage")
    if key is None:
        raise Page(400, "Please sign in again", "Your sign-in here has expired.", "no manage session")
    if not _same(request.form.get("csrf"), data.get("csrf")):
        raise Page(403, "This form has expired", "Reload the page and try again.", "CSRF check failed (session)")
    return key, data


@bp.post("/withdraw")
def withdraw():
    key, data = _managing()
    user = data["user"]
    row = _records().withdraw(request.form.get("consent", ""),
                              audit.withdrawal("withdrawn by the user at /consent", current_request_id()),
                              issuer=user["issuer"], sub=user["sub"])
    if row is None:
        raise Page(404, "No such approval", "It may have been withdrawn already. Go back to your list.",
                   "no active consent of this user with this id")
    log.info("consent withdrawn", extra={"consent": row.id, "client_id": row.client_id})
    return redirect(url_for(".manage"), 303)


@bp.post("/signout")
def signout():
    key, data = _managing()
    _records().claim_session(key)
    resp = redirect(url_for(".manage"), 303)
    _clear_cookie(resp, MANAGE_COOKIE)
    return resp
