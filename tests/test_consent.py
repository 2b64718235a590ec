"""Consent for patient-facing apps (contract section of that name), over HTTP: the
exchange's consent check and consent_required, the tickets, the sign-in at the EHR
(a real OpenID Connect provider, tests/oidc_provider.py), the approval, withdrawal
by the user and by admins, revocation at /introspect, audit and the FHIR export;
and the attacks on each step."""
from __future__ import annotations

import base64
import json
import re
import threading
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from conftest import (APP_REDIRECT, AT, IDT, LOGIN_CLIENT, OTHER_SECRET, SERVICE, TARGET_SECRET, TE, VENDOR_SECRET,
                      audit_rows, build_consent_world, post_token)
from fakes import SOURCE, TARGET

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


# -- helpers --------------------------------------------------------------------------
@pytest.fixture
def cworld(cli, op):
    return build_consent_world(cli, op)


def make_app(env):
    from token_exchange import create_app
    return create_app(env=env)


@pytest.fixture
def capp(env, cworld):
    application = make_app(env)
    yield application
    application.extensions["token_exchange"].store.close()
    application.extensions["token_exchange"].engine.dispose()


@pytest.fixture
def chttp(capp):
    return capp.test_client()


def exchange(http, op, sub="user-1", patient="a-123", scope="patient/Observation.rs", auth=("vendor", VENDOR_SECRET),
             token_scope="patient/*.cruds user/*.rs openid fhirUser", **over):
    data = {"grant_type": TE, "subject_token": op.access_token(sub=sub, scope=token_scope), "subject_token_type": AT,
            "actor_token": op.id_token(sub=sub, patient=patient), "actor_token_type": IDT, "resource": TARGET,
            "scope": scope}
    data.update(over)
    return post_token(http, {k: v for k, v in data.items() if v is not None}, auth=auth)


def consent_uri_of(r):
    body = r.get_json()
    assert r.status_code == 400 and body["error"] == "consent_required", body
    assert body["expires_in"] == 600
    return body["consent_uri"]


def local(url):
    """A service URL as the test client takes it (path and query)."""
    parts = urlsplit(url)
    assert url.startswith(SERVICE + "/"), url
    return parts.path + (f"?{parts.query}" if parts.query else "")


def csrf_of(r):
    m = CSRF.search(r.get_data(as_text=True))
    assert m, r.get_data(as_text=True)
    return m.group(1)


class Browser:
    """A person's browser for the HTTP tests: the Flask test client's cookie jar for the
    service, a requests session (cookies included) for the EHR."""

    def __init__(self, http, op):
        self.http, self.op = http, op
        self.at_op = requests.Session()

    def open(self, consent_uri, redirect_uri=None, state=None):
        q = {k: v for k, v in (("redirect_uri", redirect_uri), ("state", state)) if v is not None}
        return self.http.get(local(consent_uri) + (("&" if "?" in consent_uri else "?") + urlencode(q) if q else ""))

    def continue_(self, consent_uri, page=None, **fields):
        page = page if page is not None else self.open(consent_uri, fields.get("redirect_uri"), fields.get("state"))
        assert page.status_code == 200, page.get_data(as_text=True)
        data = {"csrf": csrf_of(page)}
        data.update({k: v for k, v in fields.items() if v is not None})
        return self.http.post(local(consent_uri), data=data)

    def sign_in(self, authorize_url, username="patient"):
        """At the EHR: the login form (or single sign-on) -> the redirect to the callback."""
        r = self.at_op.get(authorize_url, allow_redirects=False)
        if r.status_code == 200:  # the login form
            r = self.at_op.post(authorize_url, data={"username": username, "password": f"{username}-pw"},
                                allow_redirects=False)
        assert r.status_code == 302, r.text
        return r.headers["Location"]

    def callback(self, location):
        return self.http.get(local(location))

    def signed_in(self, consent_uri, username="patient", **fields):
        r = self.continue_(consent_uri, **fields)
        assert r.status_code == 303, r.get_data(as_text=True)
        r = self.callback(self.sign_in(r.headers["Location"], username))
        return r

    def approve(self, consent_uri, username="patient", decision="allow", days="30", **fields):
        r = self.signed_in(consent_uri, username, **fields)
        assert r.status_code == 303 and r.headers["Location"].endswith("/consent/approve"), r.get_data(as_text=True)
        page = self.http.get("/consent/approve")
        assert page.status_code == 200, page.get_data(as_text=True)
        return self.http.post("/consent/approve", data={"csrf": csrf_of(page), "decision": decision, "days": days})


def basic(user, pw):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def introspect(http, token):
    return http.post("/introspect", data={"token": token}, headers=basic("hospital-b", TARGET_SECRET)).get_json()


def consents(cli, *args):
    return json.loads(cli("consent", "list", "--json", *args).output)


def granted_flow(http, op, **kw):
    uri = consent_uri_of(exchange(http, op, **kw))
    r = Browser(http, op).approve(uri)
    assert r.status_code == 200 and "You allowed" in r.get_data(as_text=True)
    return uri


# -- the exchange: consent_required ------------------------------------------------------
def test_trust_requiring_consent_refuses_without_one_with_a_consent_uri(chttp, op, cli):
    r = exchange(chttp, op)
    body = r.get_json()
    assert r.status_code == 400 and r.headers["Cache-Control"] == "no-store"
    assert set(body) == {"error", "error_description", "consent_uri", "expires_in"}
    assert body["error"] == "consent_required" and body["expires_in"] == 600
    assert body["consent_uri"].startswith(SERVICE + "/consent/t/")
    ticket = body["consent_uri"].rsplit("/", 1)[1]
    assert len(base64.urlsafe_b64decode(ticket + "==")) >= 16  # >= 128 bits
    rows = audit_rows(cli)
    assert rows[-1]["error"] == "consent_required" and rows[-1]["outcome"] == "refused"


def test_ticket_is_stored_only_as_its_sha256_and_bound_to_the_exchange(chttp, op, env):
    import hashlib

    from sqlalchemy import select

    from token_exchange.db import make_engine
    from token_exchange.models import ConsentTicket
    uri = consent_uri_of(exchange(chttp, op))
    ticket = uri.rsplit("/", 1)[1]
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(select(ConsentTicket)).all()
    engine.dispose()
    assert len(rows) == 1
    row = rows[0]
    assert row.ticket_hash == hashlib.sha256(ticket.encode()).hexdigest()
    assert ticket not in repr(tuple(row))
    assert (row.client_id, row.issuer, row.sub, row.source, row.patient, row.scopes) == (
        "vendor", op.issuer, "user-1", SOURCE, "a-123", "patient/Observation.rs")
    assert 590 <= row.expires - time.time() <= 600


def test_explain_reports_consent_required_and_creates_no_ticket(cworld, op, tmp_path, env):
    from sqlalchemy import func, select

    from token_exchange.db import make_engine
    from token_exchange.models import ConsentTicket
    (tmp_path / "at").write_text(op.access_token())
    (tmp_path / "id").write_text(op.id_token())
    r = cworld("explain", "--client", "vendor", "--subject-token", str(tmp_path / "at"), "--actor-token",
               str(tmp_path / "id"), "--resource", TARGET, "--scope", "patient/Observation.rs", "--json",
               check=False)
    report = json.loads(r.output)
    assert r.exit_code == 1 and report["decision"]["error"] == "consent_required"
    assert "consent_uri" not in report["decision"] and "/consent/t/" not in r.output
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ConsentTicket)).scalar() == 0
    engine.dispose()


# -- the whole flow over HTTP --------------------------------------------------------------
def test_consent_flow_then_exchange_is_granted_within_the_consent(chttp, op, cli):
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    r = b.approve(uri, redirect_uri=APP_REDIRECT, state="app-state-1")
    assert r.status_code == 303
    loc = r.headers["Location"]
    assert loc.startswith(APP_REDIRECT + "?")
    assert parse_qs(urlsplit(loc).query) == {"consent": ["granted"], "state": ["app-state-1"]}
    r = exchange(chttp, op)
    assert r.status_code == 200, r.get_json()
    token = r.get_json()["access_token"]
    assert introspect(chttp, token)["active"] is True
    [row] = consents(cli)
    assert row["status"] == "active" and row["client"] == "vendor" and row["sub"] == "user-1"
    assert row["patient"] == "a-123" and row["signer"] == f"{SOURCE}/Patient/a-123"
    assert row["scopes"] == "patient/Observation.rs" and row["withdrawn"] is None
    exchanges = audit_rows(cli, "--event", "exchange")
    assert exchanges[-1]["outcome"] == "granted" and exchanges[-1]["consent"] == row["id"]
    [ev] = audit_rows(cli, "--event", "consent-granted")
    assert ev["consent"] == row["id"] and ev["client_id"] == "vendor" and ev["target"] == TARGET


def test_sign_in_request_is_code_with_pkce_s256_state_nonce_and_source_aud(chttp, op):
    uri = consent_uri_of(exchange(chttp, op))
    r = Browser(chttp, op).continue_(uri)
    assert r.status_code == 303 and "/consent/t/" not in r.headers["Location"]
    q = parse_qs(urlsplit(r.headers["Location"]).query)
    assert urlsplit(r.headers["Location"])._replace(query="").geturl() == op.issuer + "/authorize"
    assert q["response_type"] == ["code"] and q["client_id"] == [LOGIN_CLIENT]
    assert q["code_challenge_method"] == ["S256"] and len(q["code_challenge"][0]) == 43
    assert set(q["scope"][0].split()) == {"openid", "fhirUser"} and q["aud"] == [SOURCE]
    assert q["response_mode"] == ["query"] and q["redirect_uri"] == [SERVICE + "/consent/callback"]
    assert len(q["state"][0]) >= 43 and len(q["nonce"][0]) >= 43


def test_code_exchange_authenticates_with_the_login_secret_and_sends_the_verifier(chttp, op):
    granted_flow(chttp, op)
    [req] = op.token_requests
    assert req["authorization"].startswith("Basic ")
    assert base64.b64decode(req["authorization"][6:]).decode().startswith(LOGIN_CLIENT + ":")
    assert req["form"]["grant_type"] == "authorization_code" and len(req["form"]["code_verifier"]) >= 43


def test_login_client_without_secret_uses_private_key_jwt_with_the_service_key(chttp, op, cli):
    from sqlalchemy import update

    from token_exchange.db import make_engine
    from token_exchange.models import Issuer
    engine = make_engine(cli.env["TOKEN_EXCHANGE_DATABASE_URL"])
    with engine.begin() as conn:  # the CLI has no option to drop a secret; the state it leaves
        conn.execute(update(Issuer).values(login_secret=None))
    engine.dispose()
    cli("issuer", "update", op.issuer, "--login-client-id", "te-login-jwt")
    jwks = chttp.get("/jwks").get_json()
    op.add_client("te-login-jwt", [SERVICE + "/consent/callback"], jwks=jwks)
    granted_flow(chttp, op)
    [req] = op.token_requests
    assert req["authorization"] is None
    assert req["form"]["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    import jwt as pyjwt
    header = pyjwt.get_unverified_header(req["form"]["client_assertion"])
    assert header["typ"] == "JWT" and header["kid"] in {k["kid"] for k in jwks["keys"]}


def test_deny_records_no_consent_and_redirects_with_consent_denied(chttp, op, cli):
    uri = consent_uri_of(exchange(chttp, op))
    r = Browser(chttp, op).approve(uri, decision="deny", redirect_uri=APP_REDIRECT, state="s2")
    assert r.status_code == 303
    assert parse_qs(urlsplit(r.headers["Location"]).query) == {"consent": ["denied"], "state": ["s2"]}
    assert consents(cli) == []
    [ev] = audit_rows(cli, "--event", "consent-denied")
    assert ev["outcome"] == "refused" and ev["client_id"] == "vendor"
    assert exchange(chttp, op).get_json()["error"] == "consent_required"


def test_without_redirect_uri_the_page_says_you_may_close_this_window(chttp, op):
    uri = consent_uri_of(exchange(chttp, op))
    r = Browser(chttp, op).approve(uri)
    assert r.status_code == 200 and "You may close this window" in r.get_data(as_text=True)


def test_approval_page_names_app_target_patient_and_scopes_in_plain_words(chttp, op):
    uri = consent_uri_of(exchange(chttp, op, scope="patient/Observation.rs patient/Appointment.cruds"))
    b = Browser(chttp, op)
    b.signed_in(uri)
    text = chttp.get("/consent/approve").get_data(as_text=True)
    for words in ("Acme Health", "hospital-b", TARGET, "a-123", "read your observations",
                  "read and write your appointments", "Allow", "Deny"):
        assert words in text, words
    days = re.findall(r'name="days" id="days-(\d+)"', text)
    assert days == ["1", "7", "30", "90"]
    assert '<html lang="en">' in text and '<label for="days-30">' in text


def test_duration_choice_is_capped_by_the_trusts_maximum(chttp, op, cli):
    cli("trust", "update", "--client", "vendor", "--issuer", op.issuer, "--target", TARGET,
        "--consent-max-days", "10")
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    b.signed_in(uri)
    page = chttp.get("/consent/approve")
    assert re.findall(r'name="days" id="days-(\d+)"', page.get_data(as_text=True)) == ["1", "7", "10"]
    r = chttp.post("/consent/approve", data={"csrf": csrf_of(page), "decision": "allow", "days": "30"})
    assert r.status_code == 400 and consents(cli) == []
    r = chttp.post("/consent/approve", data={"csrf": csrf_of(page), "decision": "allow", "days": "10"})
    assert r.status_code == 200
    [row] = consents(cli)
    from datetime import datetime
    length = datetime.fromisoformat(row["expires"]) - datetime.fromisoformat(row["granted"])
    assert length.days == 10


def test_minted_token_never_outlives_its_consent(chttp, op, env):
    from sqlalchemy import update

    from token_exchange.db import make_engine
    from token_exchange.models import Consent
    granted_flow(chttp, op)
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    from datetime import datetime, timedelta, timezone
    with engine.begin() as conn:
        conn.execute(update(Consent).values(expires=datetime.now(timezone.utc) + timedelta(seconds=100)))
    engine.dispose()
    r = exchange(chttp, op)
    assert r.status_code == 200 and 90 <= r.get_json()["expires_in"] <= 100


# -- scopes -----------------------------------------------------------------------------------
def test_scopes_within_the_consent_are_granted_silently(chttp, op):
    granted_flow(chttp, op, scope="patient/Observation.rs patient/Condition.rs")
    r = exchange(chttp, op, scope="patient/Observation.r")
    assert r.status_code == 200 and r.get_json()["scope"] == "patient/Observation.r"


def test_scopes_beyond_the_consent_ask_again_for_the_union(chttp, op, env):
    from sqlalchemy import select

    from token_exchange.db import make_engine
    from token_exchange.models import ConsentTicket
    granted_flow(chttp, op, scope="patient/Observation.rs")
    uri = consent_uri_of(exchange(chttp, op, scope="patient/Observation.rs patient/Condition.rs"))
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    import hashlib
    with engine.connect() as conn:
        row = conn.execute(select(ConsentTicket).where(ConsentTicket.ticket_hash == hashlib.sha256(
            uri.rsplit("/", 1)[1].encode()).hexdigest())).first()
    engine.dispose()
    assert set(row.scopes.split()) == {"patient/Observation.rs", "patient/Condition.rs"}


def test_new_consent_for_the_same_key_withdraws_the_older_one(chttp, op, cli):
    granted_flow(chttp, op, scope="patient/Observation.rs")
    old = exchange(chttp, op).get_json()["access_token"]
    uri = consent_uri_of(exchange(chttp, op, scope="patient/Observation.rs patient/Condition.rs"))
    Browser(chttp, op).approve(uri)
    rows = consents(cli)
    assert [r["status"] for r in rows] == ["withdrawn", "active"]
    assert set(rows[1]["scopes"].split()) == {"patient/Observation.rs", "patient/Condition.rs"}
    assert introspect(chttp, old) == {"active": False}
    assert exchange(chttp, op, scope="patient/Condition.rs").status_code == 200


def test_consent_of_user_a_does_not_cover_user_b(chttp, op):
    granted_flow(chttp, op)
    assert exchange(chttp, op, sub="user-2", patient="a-123").get_json()["error"] == "consent_required"


def test_consent_for_one_patient_does_not_cover_another(chttp, op, cli):
    granted_flow(chttp, op)
    cli("link", "add", "--source", SOURCE, "--patient", "a-777", "--target", TARGET, "--target-patient", "b-777")
    assert exchange(chttp, op, patient="a-777").get_json()["error"] == "consent_required"


def test_consent_of_one_client_does_not_cover_another(chttp, op):
    granted_flow(chttp, op)
    r = exchange(chttp, op, auth=("other", OTHER_SECRET))
    assert r.get_json()["error"] == "consent_required"


# -- tickets ---------------------------------------------------------------------------------------
def test_ticket_is_single_use(chttp, op, cli):
    uri = granted_flow(chttp, op)
    b = Browser(chttp, op)
    r = b.open(uri)
    assert r.status_code == 410 and "no longer" in r.get_data(as_text=True)
    assert "Location" not in r.headers
    assert len(consents(cli)) == 1


def test_expired_ticket_shows_an_error_page_and_never_redirects(chttp, op, env):
    from sqlalchemy import update

    from token_exchange.db import make_engine
    from token_exchange.models import ConsentTicket
    uri = consent_uri_of(exchange(chttp, op))
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(update(ConsentTicket).values(expires=int(time.time()) - 1))
    engine.dispose()
    r = Browser(chttp, op).open(uri, redirect_uri=APP_REDIRECT, state="x")
    assert r.status_code == 410 and "Location" not in r.headers


def test_unknown_ticket_is_404(chttp):
    r = chttp.get("/consent/t/" + "A" * 43)
    assert r.status_code == 404 and "text/html" in r.headers["Content-Type"]


def test_ticket_used_by_another_browser_is_409(chttp, capp, op, cli):
    uri = consent_uri_of(exchange(chttp, op))
    first = Browser(chttp, op)
    r = first.continue_(uri)
    assert r.status_code == 303
    second = Browser(capp.test_client(), op)
    assert second.open(uri).status_code == 409
    page = first.open(uri)  # the first browser resumes
    assert page.status_code == 200
    r = second.http.post(local(uri), data={"csrf": "x"})
    assert r.status_code in (403, 409)
    r = first.callback(first.sign_in(first.continue_(uri, page=page).headers["Location"]))
    assert r.status_code == 303
    assert first.open(uri).status_code == 303  # signed in: reopening resumes at the approval page


def test_ticket_of_one_client_cannot_be_approved_for_another(chttp, op, cli):
    """The ticket binds the client: its approval records a consent for that client only."""
    uri = consent_uri_of(exchange(chttp, op, auth=("other", OTHER_SECRET)))
    Browser(chttp, op).approve(uri)
    [row] = consents(cli)
    assert row["client"] == "other"
    assert exchange(chttp, op).get_json()["error"] == "consent_required"
    assert exchange(chttp, op, auth=("other", OTHER_SECRET)).status_code == 200


def test_redirect_uri_must_be_registered_exactly(chttp, op, cli):
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    for bad in ("https://evil.example/cb", APP_REDIRECT + "x", APP_REDIRECT + "/../x", APP_REDIRECT.upper()):
        r = b.open(uri, redirect_uri=bad)
        assert r.status_code == 400 and "Location" not in r.headers, bad
        page = b.open(uri)
        r = b.http.post(local(uri), data={"csrf": csrf_of(page), "redirect_uri": bad})
        assert r.status_code == 400 and "Location" not in r.headers, bad
    assert consents(cli) == []


def test_continue_without_or_with_a_wrong_csrf_token_is_refused(chttp, op, env):
    from sqlalchemy import select

    from token_exchange.db import make_engine
    from token_exchange.models import ConsentTicket
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    page = b.open(uri)
    assert b.http.post(local(uri), data={}).status_code == 403
    assert b.http.post(local(uri), data={"csrf": csrf_of(page) + "x"}).status_code == 403
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    with engine.connect() as conn:
        assert conn.execute(select(ConsentTicket.session_hash)).scalar() is None  # nothing bound
    engine.dispose()


def test_approve_without_or_with_a_wrong_csrf_token_is_refused(chttp, op, cli):
    uri = consent_uri_of(exchange(chttp, op))
    Browser(chttp, op).signed_in(uri)
    page = chttp.get("/consent/approve")
    for data in ({"decision": "allow", "days": "1"}, {"decision": "allow", "days": "1", "csrf": "forged"}):
        assert chttp.post("/consent/approve", data=data).status_code == 403
    assert consents(cli) == []
    assert chttp.post("/consent/approve", data={"csrf": csrf_of(page), "decision": "allow",
                                                "days": "1"}).status_code == 200


def test_get_of_the_consent_uri_stores_nothing(chttp, op, env):
    from sqlalchemy import func, select

    from token_exchange.db import make_engine
    from token_exchange.models import BrowserSession, ConsentTicket
    uri = consent_uri_of(exchange(chttp, op))
    Browser(chttp, op).open(uri)
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(BrowserSession)).scalar() == 0
        assert conn.execute(select(ConsentTicket.session_hash)).scalar() is None
    engine.dispose()


# -- the sign-in ---------------------------------------------------------------------------------
def test_another_user_signing_in_records_nothing(chttp, op, cli):
    uri = consent_uri_of(exchange(chttp, op))
    r = Browser(chttp, op).signed_in(uri, username="other")
    assert r.status_code == 403 and "sign in as the person" in r.get_data(as_text=True).lower()
    assert chttp.get("/consent/approve").status_code == 400
    assert consents(cli) == [] and audit_rows(cli, "--event", "consent-granted") == []


def test_signer_patient_refuses_a_related_person_and_any_accepts_them(chttp, op, cli):
    uri = consent_uri_of(exchange(chttp, op, sub="user-3"))
    r = Browser(chttp, op).signed_in(uri, username="relative")
    assert r.status_code == 403 and "patient" in r.get_data(as_text=True)
    cli("trust", "update", "--client", "vendor", "--issuer", op.issuer, "--target", TARGET,
        "--consent-signer", "any")
    uri = consent_uri_of(exchange(chttp, op, sub="user-3"))
    r = Browser(chttp, op).approve(uri, username="relative")
    assert r.status_code == 200
    [row] = consents(cli)
    assert row["signer"] == f"{SOURCE}/RelatedPerson/r-1" and row["sub"] == "user-3"


def test_callback_with_a_wrong_state_is_refused(chttp, op, cli):
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    r = b.continue_(uri)
    loc = b.sign_in(r.headers["Location"])
    q = parse_qs(urlsplit(loc).query)
    forged = "/consent/callback?" + urlencode({"code": q["code"][0], "state": "not-the-state",
                                               "iss": q["iss"][0]})
    assert chttp.get(forged).status_code == 400
    assert chttp.get("/consent/callback?" + urlencode({"code": q["code"][0]})).status_code == 400
    assert op.token_requests == []  # the code was never sent
    assert b.callback(loc).status_code == 303  # the real answer still works


def test_callback_replayed_is_refused(chttp, op):
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    loc = b.sign_in(b.continue_(uri).headers["Location"])
    assert b.callback(loc).status_code == 303
    assert b.callback(loc).status_code == 400


def test_callback_in_another_browser_is_refused(chttp, capp, op):
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    loc = b.sign_in(b.continue_(uri).headers["Location"])
    assert capp.test_client().get(local(loc)).status_code == 400


def test_id_token_with_a_wrong_nonce_is_refused(chttp, op, cli):
    uri = consent_uri_of(exchange(chttp, op))
    op.id_token_overrides = {"nonce": "another-nonce"}
    r = Browser(chttp, op).signed_in(uri)
    assert r.status_code == 400 and consents(cli) == []


@pytest.mark.parametrize("claims", [{"aud": ["someone-else"]}, {"aud": ["someone-else"], "azp": LOGIN_CLIENT},
                                    {"iss": "http://evil.example"}, {"azp": "someone-else"},
                                    {"aud": [LOGIN_CLIENT, "someone-else"]}, {"exp": 1}])
def test_id_token_with_wrong_claims_is_refused(chttp, op, cli, claims):
    uri = consent_uri_of(exchange(chttp, op))
    op.id_token_overrides = claims
    r = Browser(chttp, op).signed_in(uri)
    assert r.status_code == 400 and consents(cli) == []


def test_rfc9207_iss_of_another_server_is_refused(chttp, op, cli):
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    loc = b.sign_in(b.continue_(uri).headers["Location"])
    q = parse_qs(urlsplit(loc).query)
    r = chttp.get("/consent/callback?" + urlencode({"code": q["code"][0], "state": q["state"][0],
                                                    "iss": "http://evil.example"}))
    assert r.status_code == 400 and op.token_requests == []


def test_without_rfc9207_iss_the_id_token_issuer_decides(chttp, op):
    op.iss_parameter = False
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    loc = b.sign_in(b.continue_(uri).headers["Location"])
    assert "iss" not in parse_qs(urlsplit(loc).query)
    assert b.callback(loc).status_code == 303


def test_sign_in_cancelled_at_the_ehr_records_nothing(chttp, op, cli):
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    r = b.continue_(uri)
    state = parse_qs(urlsplit(r.headers["Location"]).query)["state"][0]
    r = chttp.get("/consent/callback?" + urlencode({"error": "access_denied", "state": state, "iss": op.issuer}))
    assert r.status_code == 403 and consents(cli) == []


def test_session_cookie_is_rotated_at_sign_in(chttp, op):
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    r = b.continue_(uri)
    before = chttp.get_cookie("te_consent").value
    r = b.callback(b.sign_in(r.headers["Location"]))
    after = chttp.get_cookie("te_consent").value
    assert r.status_code == 303 and before != after


# -- pages: headers and cookies ------------------------------------------------------------------------
def test_every_consent_page_forbids_framing_and_has_a_strict_csp(chttp, op):
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    pages = [b.open(uri), chttp.get("/consent"), chttp.get("/consent/t/unknown"), chttp.get("/consent/approve")]
    b.signed_in(uri)
    pages.append(chttp.get("/consent/approve"))
    for r in pages:
        csp = r.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "style-src 'self'" in csp
        assert "script-src" not in csp and "unsafe" not in csp
        assert r.headers["Referrer-Policy"] == "no-referrer" and r.headers["Cache-Control"] == "no-store"
        assert r.headers["X-Frame-Options"] == "DENY"
    assert f"form-action 'self' http://{op.host}:{op.port}" in pages[0].headers["Content-Security-Policy"]


class HostileDiscovery:
    """Another EHR whose OpenID Connect discovery document names a hostile
    authorization_endpoint (the outside world, served on loopback)."""

    def __init__(self, authorization_endpoint):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from fakes import free_port
        port = free_port()
        self.issuer = f"http://127.0.0.1:{port}/evil-ehr"
        doc = json.dumps({"issuer": self.issuer, "authorization_endpoint": authorization_endpoint,
                          "token_endpoint": self.issuer + "/token", "jwks_uri": self.issuer + "/jwks"}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path.endswith("/openid-configuration") else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(doc)))
                self.end_headers()
                self.wfile.write(doc)

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _form_actions(csp):
    return [d.strip() for d in csp.split(";") if d.strip().startswith("form-action")]


@pytest.mark.parametrize("authorization_endpoint", [
    "http://[::1/authorize",
    "http://127.0.0.1:{port};frame-ancestors *;script-src 'unsafe-inline' x/ehr/authorize",
    "http://127.0.0.1:{port} 'unsafe-inline'/authorize",
    "javascript:alert(1)",
    "http://user:pw@127.0.0.1:{port}/authorize",
    "http://127.0.0.1:99999/authorize",
])
def test_one_ehr_s_hostile_discovery_disables_its_own_sign_in_only_and_never_enters_the_csp(
        chttp, op, cli, authorization_endpoint):
    """Issue 'Hardening III' 4 and 5: a bad authorization_endpoint took /consent down for
    every EHR (a 500), and a ';' in it injected CSP directives (the pages became frameable)."""
    evil = HostileDiscovery(authorization_endpoint.format(port=op.port))
    try:
        cli("issuer", "add", evil.issuer, "--jwks-uri", evil.issuer + "/jwks", "--source", "https://evil.example/fhir",
            "--login-client-id", LOGIN_CLIENT, "--login-secret-env", "LOGIN_SECRET")
        r = chttp.get("/consent")
        assert r.status_code == 200
        csp = r.headers["Content-Security-Policy"]
        assert _form_actions(csp) == [f"form-action 'self' http://{op.host}:{op.port}"], csp
        assert csp.count("frame-ancestors") == 1 and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert "script-src" not in csp
        r = chttp.post("/consent/signin", data={"csrf": csrf_of(r), "issuer": evil.issuer})
        assert r.status_code == 503 and "not available" in r.get_data(as_text=True)
        assert _form_actions(r.headers["Content-Security-Policy"]) == ["form-action 'self'"]
    finally:
        evil.stop()


def test_cookies_are_httponly_lax_and_secure_under_https(cworld, op, env):
    def cookies_of(app):
        http = app.test_client()
        r = exchange(http, op)
        uri = consent_uri_of(r)
        page = http.get(urlsplit(uri).path)
        r = http.post(urlsplit(uri).path, data={"csrf": csrf_of(page)})
        return page.headers.getlist("Set-Cookie") + r.headers.getlist("Set-Cookie")
    for cookie in cookies_of(make_app(env)):
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    secure = make_app(dict(env, TOKEN_EXCHANGE_ISSUER="https://te.example"))
    set_cookies = cookies_of(secure)
    assert len(set_cookies) == 2
    for cookie in set_cookies:
        assert cookie.startswith("__Host-") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert "Secure" in cookie and "Path=/" in cookie


def test_stylesheet_is_served_by_the_service(chttp):
    r = chttp.get("/consent/static/consent.css")
    assert r.status_code == 200 and r.mimetype == "text/css"


# -- withdrawal -----------------------------------------------------------------------------------
def test_user_withdraws_at_consent_and_tokens_under_it_become_inactive(chttp, op, cli):
    granted_flow(chttp, op)
    token = exchange(chttp, op).get_json()["access_token"]
    r = chttp.get("/consent")
    assert r.status_code == 200 and "Sign in at" in r.get_data(as_text=True)
    r = chttp.post("/consent/signin", data={"csrf": csrf_of(r), "issuer": op.issuer})
    assert r.status_code == 303
    r = chttp.get(local(Browser(chttp, op).sign_in(r.headers["Location"])))
    assert r.status_code == 303 and r.headers["Location"].endswith("/consent")
    page = chttp.get("/consent")
    text = page.get_data(as_text=True)
    assert "Acme Health" in text and "read your observations" in text and "Withdraw" in text
    [row] = consents(cli)
    r = chttp.post("/consent/withdraw", data={"csrf": csrf_of(page), "consent": row["id"]})
    assert r.status_code == 303
    assert "no active approvals" in chttp.get("/consent").get_data(as_text=True)
    assert consents(cli)[0]["status"] == "withdrawn"
    assert introspect(chttp, token) == {"active": False}
    assert exchange(chttp, op).get_json()["error"] == "consent_required"
    [ev] = audit_rows(cli, "--event", "consent-withdrawn")
    assert ev["consent"] == row["id"] and ev["subject"] == "user-1"


def test_user_cannot_withdraw_another_users_consent(chttp, capp, op, cli):
    granted_flow(chttp, op)
    [row] = consents(cli)
    other = capp.test_client()
    r = other.get("/consent")
    r = other.post("/consent/signin", data={"csrf": csrf_of(r), "issuer": op.issuer})
    r = other.get(local(Browser(other, op).sign_in(r.headers["Location"], "other")))
    page = other.get("/consent")
    assert "Acme Health" not in page.get_data(as_text=True)
    assert other.post("/consent/withdraw", data={"csrf": csrf_of(page), "consent": row["id"]}).status_code == 404
    assert consents(cli)[0]["status"] == "active"


def test_withdraw_needs_the_sessions_csrf_token(chttp, op, cli):
    granted_flow(chttp, op)
    [row] = consents(cli)
    r = chttp.get("/consent")
    r = chttp.post("/consent/signin", data={"csrf": csrf_of(r), "issuer": op.issuer})
    chttp.get(local(Browser(chttp, op).sign_in(r.headers["Location"])))
    assert chttp.post("/consent/withdraw", data={"consent": row["id"]}).status_code == 403
    assert consents(cli)[0]["status"] == "active"


def test_admin_withdraws_and_tokens_under_it_introspect_inactive(chttp, op, cli):
    granted_flow(chttp, op)
    token = exchange(chttp, op).get_json()["access_token"]
    [row] = consents(cli)
    r = cli("consent", "withdraw", row["id"])
    assert "withdrawn" in r.output
    assert introspect(chttp, token) == {"active": False}
    assert exchange(chttp, op).get_json()["error"] == "consent_required"
    again = cli("consent", "withdraw", row["id"], check=False)
    assert again.exit_code == 1 and again.stderr.startswith("error:")
    [ev] = audit_rows(cli, "--event", "consent-withdrawn")
    assert ev["reason"].startswith("withdrawn by admin")


def test_withdrawal_racing_an_exchange_leaves_the_token_inactive(chttp, capp, op, cli):
    """The exchange read the consent as active; the withdrawal commits before the token
    is recorded: the token is still tied to the consent, so it introspects inactive."""
    granted_flow(chttp, op)
    [row] = consents(cli)
    records = capp.extensions["token_exchange"].store.consents
    real = records.find_active

    def find_then_withdraw(**key):
        found = real(**key)
        cli("consent", "withdraw", row["id"])
        return found
    records.find_active = find_then_withdraw
    try:
        r = exchange(chttp, op)
    finally:
        records.find_active = real
    assert r.status_code == 200
    assert introspect(chttp, r.get_json()["access_token"]) == {"active": False}


def test_expired_consent_asks_again_and_its_tokens_are_inactive(chttp, op, env):
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import update

    from token_exchange.db import make_engine
    from token_exchange.models import Consent
    granted_flow(chttp, op)
    token = exchange(chttp, op).get_json()["access_token"]
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(update(Consent).values(expires=datetime.now(timezone.utc) - timedelta(seconds=1)))
    engine.dispose()
    assert introspect(chttp, token) == {"active": False}
    assert exchange(chttp, op).get_json()["error"] == "consent_required"


# -- the CLI -----------------------------------------------------------------------------------------
def test_consent_list_show_and_filters(chttp, op, cli):
    granted_flow(chttp, op)
    uri = consent_uri_of(exchange(chttp, op, auth=("other", OTHER_SECRET)))
    Browser(chttp, op).approve(uri)
    rows = consents(cli)
    assert len(rows) == 2
    assert set(rows[0]) == {"id", "status", "withdrawn", "issuer", "sub", "signer", "client", "target", "source",
                            "patient", "scopes", "granted", "expires"}
    assert [r["client"] for r in consents(cli, "--client", "other")] == ["other"]
    assert len(consents(cli, "--target", "hospital-b")) == 2
    shown = json.loads(cli("consent", "show", rows[0]["id"], "--json").output)
    assert shown["id"] == rows[0]["id"] and shown["target"] == TARGET
    table = cli("consent", "list").output
    assert "active" in table and rows[0]["id"] in table
    missing = cli("consent", "show", "nope", check=False)
    assert missing.exit_code == 1 and missing.stderr.startswith("error:")


def test_consent_export_is_a_fhir_r4_bundle_of_consents_and_denials(chttp, op, cli):
    from fhir.resources.R4B.bundle import Bundle
    granted_flow(chttp, op)
    uri = consent_uri_of(exchange(chttp, op, auth=("other", OTHER_SECRET)))
    Browser(chttp, op).approve(uri, decision="deny")
    bundle = json.loads(cli("consent", "export", "--format", "fhir").output)
    Bundle.model_validate(bundle)  # valid FHIR R4 (R4B's Consent is R4's)
    resources = [e["resource"] for e in bundle["entry"]]
    assert [r["status"] for r in resources] == ["active", "rejected"]
    c = resources[0]
    assert c["resourceType"] == "Consent"
    assert c["scope"]["coding"][0]["code"] == "patient-privacy"
    assert c["category"][0]["coding"][0] == {"system": "http://loinc.org", "code": "59284-0",
                                             "display": "Patient Consent"}
    assert c["patient"]["reference"] == f"{SOURCE}/Patient/a-123"
    assert c["performer"][0]["reference"] == f"{SOURCE}/Patient/a-123"
    roles = {a["role"]["coding"][0]["code"]: a["reference"] for a in c["provision"]["actor"]}
    assert set(roles) == {"IRCP", "CST"} and roles["CST"]["identifier"]["value"] == TARGET
    assert c["provision"]["period"]["start"] and c["provision"]["period"]["end"]
    assert "patient/Observation.rs" in json.dumps(c["provision"])


def test_consent_pages_work_across_two_instances(cworld, op, env, cli):
    """A ticket made by one instance, each step of the flow served by the other one in turn."""
    a, b = make_app(env), make_app(env)
    try:
        ha, hb = a.test_client(), b.test_client()
        uri = consent_uri_of(exchange(ha, op))
        page = hb.get(urlsplit(uri).path)
        carry(hb, ha)  # the cookies follow the browser, whichever instance answers
        r = ha.post(urlsplit(uri).path, data={"csrf": csrf_of(page)})
        assert r.status_code == 303
        loc = Browser(ha, op).sign_in(r.headers["Location"])
        carry(ha, hb)
        r = hb.get(local(loc))
        assert r.status_code == 303
        carry(hb, ha)
        page = ha.get("/consent/approve")
        assert page.status_code == 200
        carry(ha, hb)
        r = hb.post("/consent/approve", data={"csrf": csrf_of(page), "decision": "allow", "days": "7"})
        assert r.status_code == 200
        assert exchange(hb, op).status_code == 200 and exchange(ha, op).status_code == 200
    finally:
        for app_ in (a, b):
            app_.extensions["token_exchange"].store.close()
            app_.extensions["token_exchange"].engine.dispose()


def carry(src, dst, names=("te_csrf", "te_consent")):
    """One browser talking to two instances: copy its cookies from one client to the other."""
    for name in names:
        c = src.get_cookie(name)
        if c is None:
            dst.delete_cookie(name)
        else:
            dst.set_cookie(name, c.value)


def test_concurrent_approvals_of_one_ticket_record_one_consent(chttp, capp, op, cli):
    """Allow sent twice at once (two tabs, a double click): the ticket is spent once."""
    uri = consent_uri_of(exchange(chttp, op))
    Browser(chttp, op).signed_in(uri)
    page = chttp.get("/consent/approve")
    results = []

    def post():
        client = capp.test_client()
        carry(chttp, client)
        results.append(client.post("/consent/approve", data={"csrf": csrf_of(page), "decision": "allow",
                                                             "days": "1"}).status_code)
    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count(200) == 1, results
    assert len(consents(cli)) == 1


# -- what an anonymous caller can make the service store (SECURITY.md, resource model) -------------
def session_rows(env):
    """The browser_session rows' data, read from the database itself, but for the one
    cookie key of the day (consent/state.py) every instance shares."""
    from sqlalchemy import select

    from token_exchange.db import make_engine
    from token_exchange.models import BrowserSession
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            rows = [(r.key, r.data) for r in conn.execute(select(BrowserSession.key, BrowserSession.data))]
    finally:
        engine.dispose()
    keys = [k for k, _ in rows if k.startswith("signin-key:")]
    assert len(keys) <= 1, keys
    return [d for k, d in rows if k not in keys]


def metric(http, name):
    from prometheus_client.parser import text_string_to_metric_families
    text = http.get("/metrics").get_data(as_text=True)
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}.get(name, 0)


def test_anonymous_sign_in_starts_store_no_session_until_the_ehr_answers(chttp, op, env):
    """Issue 26, finding 7: 400 anonymous POST /consent/signin (one CSRF pair from a plain
    GET /consent) made 400 browser_session rows. A sign-in start stores nothing: its state
    travels sealed in the browser; a session is stored once the EHR's answer comes back."""
    page = chttp.get("/consent")
    csrf = csrf_of(page)
    for _ in range(400):
        r = chttp.post("/consent/signin", data={"csrf": csrf, "issuer": op.issuer})
        assert r.status_code == 303 and r.headers["Location"].startswith(op.issuer)
    assert session_rows(env) == []
    assert metric(chttp, "token_exchange_consent_signin_starts_total") == 400
    r = chttp.get(local(Browser(chttp, op).sign_in(r.headers["Location"])))  # the last one, signed in
    assert r.status_code == 303 and r.headers["Location"].endswith("/consent")
    assert "Sign out" in chttp.get("/consent").get_data(as_text=True)
    rows = session_rows(env)
    assert [d["user"]["sub"] for d in rows if "user" in d] == ["user-1"] and len(rows) <= 2
    assert metric(chttp, "token_exchange_consent_sessions_stored_total") == 1


def test_continuing_a_ticket_stores_no_session_until_the_ehr_answers(chttp, op, env):
    """The ticket flow's sign-in start binds the ticket to this browser and stores no
    session either, however often it is repeated."""
    uri = consent_uri_of(exchange(chttp, op))
    b = Browser(chttp, op)
    page = b.open(uri)
    for _ in range(50):
        r = b.continue_(uri, page=page)
        assert r.status_code == 303
    assert session_rows(env) == []
    assert second_browser_is_refused(chttp, uri)
    r = b.callback(b.sign_in(r.headers["Location"]))
    assert r.status_code == 303 and r.headers["Location"].endswith("/consent/approve")
    page = chttp.get("/consent/approve")
    r = chttp.post("/consent/approve", data={"csrf": csrf_of(page), "decision": "allow", "days": "7"})
    assert r.status_code == 200 and exchange(chttp, op).status_code == 200


def second_browser_is_refused(chttp, uri):
    from flask.testing import FlaskClient
    other = FlaskClient(chttp.application)
    return other.get(local(uri)).status_code == 409


def test_sign_in_cookie_is_sealed_and_refused_when_altered_or_expired(chttp, op, monkeypatch):
    """What the callback needs travels encrypted and integrity-protected: none of state,
    nonce or verifier is readable in the cookie, and a changed or expired cookie is
    refused before the code is sent to the EHR (and counted)."""
    from token_exchange.consent import state as signin_state
    page = chttp.get("/consent")
    r = chttp.post("/consent/signin", data={"csrf": csrf_of(page), "issuer": op.issuer})
    query = parse_qs(urlsplit(r.headers["Location"]).query)
    sealed = chttp.get_cookie("te_consent_manage").value
    assert query["state"][0] not in sealed and query["nonce"][0] not in sealed and len(sealed) < 3500
    loc = Browser(chttp, op).sign_in(r.headers["Location"])
    for altered in (sealed[:-2] + ("AA" if not sealed.endswith("AA") else "BB"), "1" + sealed, sealed[:40]):
        chttp.set_cookie("te_consent_manage", altered)
        assert chttp.get(local(loc)).status_code == 400
    assert op.token_requests == []
    assert metric(chttp, "token_exchange_consent_signin_refusals_total") == 3
    monkeypatch.setattr(signin_state, "SIGNIN_TTL", 0)  # a sign-in cookie that has lapsed
    r = chttp.post("/consent/signin", data={"csrf": csrf_of(page), "issuer": op.issuer})
    assert chttp.get(local(Browser(chttp, op).sign_in(r.headers["Location"]))).status_code == 400
    assert op.token_requests == []


def test_callback_replayed_with_its_sign_in_cookie_is_refused_at_another_instance(cworld, op, env):
    """The state is used once across instances: the replay (the same callback URL with the
    same sealed cookie) is refused before its code reaches the EHR."""
    a, b = make_app(env), make_app(env)
    try:
        ha, hb = a.test_client(), b.test_client()
        page = ha.get("/consent")
        r = ha.post("/consent/signin", data={"csrf": csrf_of(page), "issuer": op.issuer})
        loc = Browser(ha, op).sign_in(r.headers["Location"])
        carry(ha, hb, names=("te_consent_manage",))
        r = hb.get(local(loc))  # started at one instance, finished at the other
        assert r.status_code == 303 and "Sign out" in hb.get("/consent").get_data(as_text=True)
        assert len(op.token_requests) == 1
        replay = a.test_client()
        carry(ha, replay, names=("te_consent_manage",))  # the sealed cookie, as it was before the callback
        assert replay.get(local(loc)).status_code == 400
        assert len(op.token_requests) == 1
    finally:
        for app_ in (a, b):
            app_.extensions["token_exchange"].store.close()
            app_.extensions["token_exchange"].engine.dispose()


def test_sign_in_cookie_key_is_shared_through_the_database_and_sealed_at_rest(cworld, op, env):
    """Every instance opens another's sign-in cookie (one key of the day in the database);
    with TOKEN_EXCHANGE_KEY_SECRET the key is stored sealed; an instance with another
    secret (after a change of it) uses a key of its own: its sign-ins work, the others'
    cookies are refused, and nothing answers 500."""
    from sqlalchemy import select

    from token_exchange.models import BrowserSession
    from token_exchange.sealing import SEALED_PREFIX
    secret = "k" * 40
    a, b = make_app(dict(env, TOKEN_EXCHANGE_KEY_SECRET=secret)), make_app(dict(env, TOKEN_EXCHANGE_KEY_SECRET=secret))
    c = make_app(dict(env, TOKEN_EXCHANGE_KEY_SECRET="x" * 40))
    try:
        ha, hb, hc = a.test_client(), b.test_client(), c.test_client()
        r = ha.post("/consent/signin", data={"csrf": csrf_of(ha.get("/consent")), "issuer": op.issuer})
        loc = Browser(ha, op).sign_in(r.headers["Location"])
        carry(ha, hb, names=("te_consent_manage",))
        assert hb.get(local(loc)).status_code == 303
        with a.extensions["token_exchange"].engine.connect() as conn:
            [key] = [r.data for r in conn.execute(select(BrowserSession.key, BrowserSession.data))
                     if r.key.startswith("signin-key:")]
        assert key["secret"].startswith(SEALED_PREFIX)
        r = hc.post("/consent/signin", data={"csrf": csrf_of(hc.get("/consent")), "issuer": op.issuer})
        assert r.status_code == 303
        loc = Browser(hc, op).sign_in(r.headers["Location"])
        carry(hc, ha, names=("te_consent_manage",))
        assert ha.get(local(loc)).status_code == 400
        assert hc.get(local(loc)).status_code == 303
    finally:
        for app_ in (a, b, c):
            app_.extensions["token_exchange"].store.close()
            app_.extensions["token_exchange"].engine.dispose()


def test_a_sign_in_state_is_spent_once_even_by_concurrent_callbacks(capp, env):
    """Two callbacks that both got past the read (an EHR accepting a code twice): the
    marker spending the state is the row's primary key, so one stores a session and the
    other stores nothing."""
    records = capp.extensions["token_exchange"].store.consents
    until = int(time.time()) + 600
    results = []

    def complete(n):
        results.append(records.complete_signin("spent-marker", until, f"{n:064x}", {"purpose": "manage",
                                                                                   "user": {"sub": str(n)}}, until))
    threads = [threading.Thread(target=complete, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert len([d for d in session_rows(env) if "user" in d]) == 1
