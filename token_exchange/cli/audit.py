"""`audit list|export`: records of exchange decisions, consent events and admin changes."""
from __future__ import annotations

import json

import click

from .common import cli, emit, iso, json_option, pass_ctx, since_arg

EVENTS = ("exchange", "consent-granted", "consent-denied", "consent-withdrawn", "revoke", "token-revoke")
AUDIT_FIELDS = ["time", "event", "grant", "client_id", "issuer", "subject", "target", "source_patient",
                "target_patient", "scope_requested", "scope_granted", "outcome", "error", "reason", "jti",
                "assertion_jti", "consent", "link", "user_link", "source_user", "target_user", "request_id", "dpop_jkt"]


@cli.group()
def audit():
    """Audit records of exchange decisions, consent events and admin changes."""


def audit_dict(e) -> dict:
    d = {f: getattr(e, f) for f in AUDIT_FIELDS}
    d["time"] = iso(e.time)
    return d


since_option = click.option("--since", metavar="ISO8601", help="Only records at or after this time.")


@audit.command("list")
@since_option
@click.option("--client", metavar="CLIENT_ID", help="Only this client's decisions.")
@click.option("--outcome", type=click.Choice(["granted", "refused"]), help="Only this outcome.")
@click.option("--event", type=click.Choice(EVENTS), help="Only this kind of event.")
@click.option("--admin", is_flag=True, help="Show admin changes made with the CLI instead.")
@json_option
@pass_ctx
def audit_list(ctx, since, client, outcome, event, admin, as_json):
    """List audit records (oldest first)."""
    since = since_arg(since)
    if admin:
        rows = [{"time": iso(e.time), "actor": e.actor, "action": e.action, "detail": e.detail}
                for e in ctx.store.admin_events(since)]
        emit(rows, as_json, ["time", "actor", "action", "detail"])
        return
    rows = [audit_dict(e) for e in ctx.store.audit_events(since, client, outcome, event=event)]
    emit(rows, as_json, ["time", "event", "client_id", "target", "outcome", "error", "scope_granted"])


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["fhir"]), required=True,
              help="fhir: a FHIR R4 Bundle of AuditEvent resources (IHE BALP).")
@since_option
@pass_ctx
def audit_export(ctx, fmt, since):
    """Write a FHIR R4 Bundle of AuditEvent resources to standard output."""
    from ..audit import fhir_bundle
    events = [audit_dict(e) for e in ctx.store.audit_events(since_arg(since))]
    click.echo(json.dumps(fhir_bundle(events, ctx.settings.issuer), indent=2))
