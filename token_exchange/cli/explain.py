"""`token-exchange explain`: why would this request be granted or refused?

It runs every check of a token request through the same grant code as
POST /token, rule by rule, with nothing written, searched or spent (no audit
record, no patient search, no consent ticket, no jti), and prints each rule's
outcome and the decision. Client authentication is not checked: the client is
named, not authenticated. Where the exchange would search the target for the
patient, explain does not: the patient step says what it would search for, and the
decision is "granted if matched", with what the service decides otherwise.
"""
from __future__ import annotations

import json
import logging
import sys
import time

import click
from werkzeug.datastructures import MultiDict

from .. import urns
from .common import Fail, cli, printable

TOKEN_TYPES = {"access_token": urns.ACCESS_TOKEN, "jwt": urns.JWT, "id_token": urns.ID_TOKEN}


def _read_token(path: str, what: str) -> str:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read(64 * 1024 + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise Fail(f"cannot read {what} from {printable(path)}: {getattr(e, 'strerror', None) or 'not UTF-8'}") \
            from None
    token = text.strip()
    if not token:
        raise Fail(f"{what} file {printable(path)} is empty")
    return token


@cli.command()
@click.option("--client", "client_id", required=True, metavar="CLIENT_ID",
              help="The client asking (not authenticated).")
@click.option("--subject-token", metavar="FILE", help="File (or - for stdin) with the subject token.")
@click.option("--subject-token-type", type=click.Choice(sorted(TOKEN_TYPES)), default="access_token",
              show_default=True, help="What the subject token is (id_token: the OpenID exchange).")
@click.option("--actor-token", metavar="FILE", help="File with the EHR's ID token sent as actor_token.")
@click.option("--assertion", metavar="FILE", help="File with a JWT authorization grant (grant_type jwt-bearer).")
@click.option("--resource", metavar="URL", help="The target FHIR server's base URL.")
@click.option("--audience", metavar="A", help="The target's base URL or registered name.")
@click.option("--scope", metavar="S", help="The scopes asked for (default: all that is allowed).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def explain(client_id, subject_token, subject_token_type, actor_token, assertion, resource, audience, scope,
            as_json):
    """Run every check of a token request and say, rule by rule, what held, what
    failed and why, and what the service would decide. Exits 0 when it would be
    granted (also when that depends on a patient search explain does not make),
    1 when refused. Writes nothing, searches nothing, spends nothing."""
    if bool(subject_token) == bool(assertion):
        raise click.UsageError("give --subject-token FILE (with --actor-token FILE if any) or --assertion FILE")
    if assertion and actor_token:
        raise click.UsageError("--actor-token goes with --subject-token, not with --assertion")
    form = MultiDict()
    if assertion:
        form.add("grant_type", urns.JWT_BEARER)
        form.add("assertion", _read_token(assertion, "the assertion"))
    else:
        form.add("grant_type", urns.TOKEN_EXCHANGE)
        form.add("subject_token", _read_token(subject_token, "the subject token"))
        form.add("subject_token_type", TOKEN_TYPES[subject_token_type])
        if actor_token:
            form.add("actor_token", _read_token(actor_token, "the actor token"))
            form.add("actor_token_type", urns.ID_TOKEN)
    for name, value in (("resource", resource), ("audience", audience), ("scope", scope)):
        if value is not None:
            form.add(name, value)
    report = run(client_id, form)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print(report)
    sys.exit(0 if report["decision"]["outcome"] in ("granted", "granted if matched") else 1)


def run(client_id: str, form: MultiDict) -> dict:
    """The rule-by-rule report of what POST /token would decide for this client and form."""
    from .. import create_app
    from ..client_auth import check_enabled
    from ..errors import OAuth2Error
    from ..settings import SettingsError
    try:
        app = create_app()
    except SettingsError as e:
        raise Fail(str(e)) from None
    ext = app.extensions["token_exchange"]
    pipeline = ext.pipeline
    logger = logging.getLogger("token_exchange")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the report says it all; no log lines beside it
    try:
        with app.app_context():
            steps, trace = [], []
            client = ext.authenticator.query_client(client_id)
            if client is None:
                steps.append({"step": "client", "outcome": "failed", "detail": "no such client is registered",
                              "error": "invalid_client"})
                return {"client": client_id, "steps": steps, "decision": {
                    "outcome": "refused", "status": 401, "error": "invalid_client",
                    "error_description": "Client authentication failed: unknown client."}}
            try:
                check_enabled(client)
            except OAuth2Error as e:
                steps.append({"step": "client", "outcome": "failed", "detail": "the client is disabled "
                              "(`token-exchange client enable` lets it ask again)", "error": e.error})
                return {"client": client_id, "steps": steps, "decision": {
                    "outcome": "refused", "status": e.status_code, "error": e.error,
                    "error_description": e.description}}
            detail = f"registered ({client.cfg.auth_method}); explain does not authenticate it"
            if client.cfg.require_dpop:
                detail += ("; it requires a DPoP proof on every request (client --require-dpop), which explain "
                           "does not check")
            steps.append({"step": "client", "outcome": "held", "detail": detail})
            grant = None
            try:
                grant_cls = pipeline.grant_class(form)
                steps.append({"step": "grant type", "outcome": "held", "detail": grant_cls.GRANT_NAME})
                grant = pipeline.dry_run(grant_cls, client, form, trace)
                grant.validate_token_request()
            except OAuth2Error as e:
                if grant is None:
                    steps.append({"step": "grant type", "outcome": "failed", "detail": e.description,
                                  "error": e.error})
                steps += [_step(t) for t in trace]
                names = [s["step"] for s in steps]
                if grant is not None:
                    steps += [{"step": n, "outcome": "not checked", "detail": "an earlier rule failed"}
                              for n, _ in grant.STEPS if n not in names]
                status = getattr(e, "status_code", 400)
                decision = {"outcome": "refused", "status": status, "error": e.error, "error_description":
                            e.description}
                if getattr(e, "detail", None):
                    decision["reason"] = e.detail
                return {"client": client_id, "steps": steps, "decision": decision}
            steps += [_step(t) for t in trace]
            now = int(time.time())
            decision = {"outcome": "granted", "status": 200, "scope": grant.granted.format(),
                        "expires_in": grant.lifetime(now), "target": grant.target.base_url}
            if grant.target_patient is not None:
                decision["patient"] = grant.target_patient
            if grant.target_user is not None:
                decision["fhirUser"] = f"{grant.target.base_url.rstrip('/')}/{grant.target_user}"
            if grant.would_search or grant.would_search_user:
                decision.update(outcome="granted if matched", searches=[w for w, on in (
                    ("patient", grant.would_search), ("user", grant.would_search_user)) if on], otherwise=_without_match(
                    grant.granted, patient=grant.would_search, user=grant.would_search_user))
            return {"client": client_id, "steps": steps, "decision": decision}
    finally:
        logger.setLevel(level)
        ext.store.close()
        ext.engine.dispose()


def _without_match(granted, patient=True, user=False) -> dict:
    """What POST /token decides when the search it would make finds no patient (or user),
    or several (rule 7: no patient at the target, no patient/ scopes; no user at a mapped
    target, no user/ scopes)."""
    from .. import policy
    from ..errors import OAuth2Error
    try:
        rest = granted
        if patient:
            rest = policy.without_patient(rest)
        if user:
            rest = policy.without_user(rest)
    except OAuth2Error as e:
        return {"outcome": "refused", "status": e.status_code, "error": e.error, "error_description": e.description}
    return {"outcome": "granted", "scope": rest.format()}


def _step(t) -> dict:
    outcome = "would search" if t.pending else "held" if t.ok else "failed"
    out = {"step": t.step, "outcome": outcome, "detail": t.detail}
    if t.error:
        out["error"] = t.error
    if t.reason:
        out["reason"] = t.reason
    return out


_MARK = {"held": "ok  ", "failed": "FAIL", "not checked": " -  ", "would search": " ?  "}


def _print(report):
    width = max(len(s["step"]) for s in report["steps"])
    for s in report["steps"]:
        click.echo(f"{_MARK[s['outcome']]} {s['step'].ljust(width)}  {printable(s['detail'])}"
                   + (f" [{printable(s['reason'])}]" if s.get("reason") else ""))
    d = report["decision"]
    if d["outcome"] == "granted":
        extra = f", patient {d['patient']}" if "patient" in d else ""
        click.echo(f"decision: granted: {printable(d['scope'])} for {d['target']}{extra}, "
                   f"{d['expires_in']} s")
    elif d["outcome"] == "granted if matched":
        o = d["otherwise"]
        otherwise = (f"granted: {printable(o['scope'])}" if o["outcome"] == "granted" else
                     f"refused with {o['status']} {o['error']}: {printable(o['error_description'])}")
        who = " and one ".join(d["searches"])
        click.echo(f"decision: granted if the search finds exactly one {who}: {printable(d['scope'])} for "
                   f"{d['target']}, {d['expires_in']} s; otherwise {otherwise}")
    else:
        click.echo(f"decision: refused with {d['status']} {d['error']}: {printable(d['error_description'])}")
