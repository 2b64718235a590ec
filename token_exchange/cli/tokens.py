"""`token revoke`: revoke minted tokens, one by its jti or every one a rule covers."""
from __future__ import annotations

import time

import click

from .. import audit
from ..clock import utcnow
from .common import Fail, check_id, cli, commit, found, get_target, pass_ctx, printable, url_arg

FORMS = ("--jti JTI | --client C | --trust --client C --issuer I --target T | "
         "--source S --patient P [--target T] | --user URL")
# `--jti`: a revocation row kept until the token has surely expired (its own exp is not
# on record): a day, or the TTL when longer.
JTI_KEEP = 86400


@cli.group()
def token():
    """Tokens this service minted."""


@token.command("revoke")
@click.option("--jti", metavar="JTI", help="One token, by its jti.")
@click.option("--client", "client_id", metavar="CLIENT_ID", help="Every token minted for this client.")
@click.option("--trust", is_flag=True, help="With --client, --issuer and --target: every token minted under "
                                            "that trust.")
@click.option("--issuer", "issuer_url", metavar="URL", help="The trust's issuer (with --trust).")
@click.option("--target", "target_ref", metavar="URL|NAME",
              help="The trust's target (with --trust); with --source and --patient, only tokens for it.")
@click.option("--source", metavar="FHIR_BASE", help="With --patient: every token minted for this source "
                                                    "patient (at any target, or --target's).")
@click.option("--patient", metavar="ID", help="The patient id at --source.")
@click.option("--user", "fhir_user", metavar="URL", help="Every token minted for this user (their fhirUser URL "
                                                         "at the source).")
@pass_ctx
def token_revoke(ctx, jti, client_id, trust, issuer_url, target_ref, source, patient, fhir_user):
    """Revoke minted tokens issued before now: they introspect inactive from then on,
    at every instance (within the reload interval; at once with Redis). Give one of:
    --jti JTI | --client C | --trust --client C --issuer I --target T |
    --source S --patient P [--target T] | --user URL. Prints how many audited grants
    the revocation covers."""
    given = {k for k, v in (("jti", jti), ("client", client_id), ("trust", trust), ("issuer", issuer_url),
                            ("target", target_ref), ("source", source), ("patient", patient),
                            ("user", fhir_user)) if v}
    forms = {"jti": {"jti"}, "client": {"client"}, "trust": {"trust", "client", "issuer", "target"},
             "patient": {"source", "patient"}, "patient at a target": {"source", "patient", "target"},
             "user": {"user"}}
    form = next((name for name, opts in forms.items() if opts == given), None)
    if form is None:
        raise Fail(f"give exactly one of: {FORMS}")
    now = utcnow()
    with ctx.store.admin.change() as change:
        if form == "jti":
            check_id(jti, "--jti")
            kind, fields = "jti", {"jti": jti}
            change.revoke_jti(jti, int(time.time()) + max(JTI_KEEP, ctx.settings.token_ttl + 60))
            covered = change.grants_covered(now, jti=jti)
        elif form == "client":
            found(change.client(client_id), "client", client_id)
            kind, fields = "client", {"client_id": client_id}
            covered = change.grants_covered(now, client_id=client_id)
        elif form == "trust":
            found(change.client(client_id), "client", client_id)
            found(change.issuer(issuer_url), "issuer", issuer_url)
            kind, fields = "trust", {"client_id": client_id, "issuer": issuer_url,
                                     "target": get_target(change, target_ref).base_url}
            covered = change.grants_covered(now, **fields)
        elif form.startswith("patient"):
            url_arg(source, "--source")
            check_id(patient, "--patient")
            target = get_target(change, target_ref).base_url if target_ref else None
            kind, fields = "patient", {"source": source, "patient": patient, "target": target}
            covered = change.grants_covered(now, issuers=change.vouching_issuers(source), patient=patient,
                                            target=target)
        else:
            url_arg(fhir_user, "--user")
            kind, fields = "user", {"fhir_user": fhir_user}
            covered = change.grants_covered(now, fhir_user=fhir_user)
        if kind != "jti":
            change.add_rule(kind, now, **fields)
        change.record(audit.token_revoke(ctx.actor, kind, fields, now, covered or 0))
        described = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        commit(ctx, change, "token.revoke", f"{kind} {described} before {now.isoformat()}")
    what = f"covers {covered} audited grant(s)"
    click.echo(f"revoked: {kind} {printable(described)}, tokens issued before {now.isoformat()}; {what}")


def revoke_on_remove(change, kind: str, **fields) -> None:
    """The rule a removal (trust, client, link) or `client disable` adds in its own
    transaction: the tokens minted under what it removes are revoked."""
    change.add_rule(kind, utcnow(), **fields)
