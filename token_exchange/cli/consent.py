"""`consent list|show|withdraw|export`: the users' consents to apps (contract,
"Consent for patient-facing apps"), their withdrawal by admins, and the FHIR export."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import click

from .. import audit
from ..consent.fhir import bundle, status
from .common import Fail, cli, emit, get_target, iso, json_option, pass_ctx, printable, show


@cli.group()
def consent():
    """Users' consents to apps reaching a target: list, show, withdraw, export."""


def consent_row(r, now) -> dict:
    c = r.Consent
    return {"id": c.id, "status": status(c, now), "withdrawn": iso(c.withdrawn), "issuer": c.issuer, "sub": c.sub,
            "signer": c.signer, "client": c.client_id, "target": r.target_url, "source": c.source or None,
            "patient": c.patient or None, "scopes": c.scopes, "granted": iso(c.granted), "expires": iso(c.expires)}


@consent.command("list")
@click.option("--client", "client_id", metavar="CLIENT_ID", help="Only this client's consents.")
@click.option("--target", "target_ref", metavar="TARGET", help="Only consents for this target (URL or name).")
@json_option
@pass_ctx
def consent_list(ctx, client_id, target_ref, as_json):
    """List the consents (oldest first): active, withdrawn and expired."""
    target_id = None
    if target_ref:
        with ctx.store.admin.change() as change:
            target_id = get_target(change, target_ref).id
    now = datetime.now(timezone.utc)
    rows = [consent_row(r, now) for r in ctx.store.consents.listed(client_id, target_id)]
    emit(rows, as_json, ["id", "status", "client", "target", "sub", "patient", "expires"])


def _get(ctx, consent_id):
    row = ctx.store.consents.get(consent_id)
    if row is None:
        raise Fail(f"no consent {printable(consent_id)!r} (`consent list` shows them)")
    return row


@consent.command("show")
@click.argument("consent_id")
@json_option
@pass_ctx
def consent_show(ctx, consent_id, as_json):
    """Show one consent (or a recorded denial)."""
    show(consent_row(_get(ctx, consent_id), datetime.now(timezone.utc)), as_json)


@consent.command("withdraw")
@click.argument("consent_id")
@pass_ctx
def consent_withdraw(ctx, consent_id):
    """Withdraw a consent: the app's next exchange asks the user again, and the tokens
    minted under it introspect as inactive from now on."""
    _get(ctx, consent_id)
    record = audit.withdrawal(f"withdrawn by admin {ctx.actor}")
    row = ctx.store.consents.withdraw(consent_id, record, admin=(ctx.actor, "consent.withdraw", consent_id))
    if row is None:
        raise Fail(f"consent {printable(consent_id)!r} is not active (already withdrawn, expired or a denial)")
    click.echo(f"consent {printable(consent_id)} withdrawn")


@consent.command("export")
@click.option("--format", "fmt", type=click.Choice(["fhir"]), required=True,
              help="fhir: a FHIR R4 Bundle of Consent resources (consents and denials).")
@pass_ctx
def consent_export(ctx, fmt):
    """Write a FHIR R4 Bundle of Consent resources to standard output, one per consent
    and one per denial (docs/CONSENT.md describes the mapping)."""
    rows = ctx.store.consents.listed(denials=True)
    click.echo(json.dumps(bundle(rows, ctx.settings.issuer, ctx.store.config().clients), indent=2))
