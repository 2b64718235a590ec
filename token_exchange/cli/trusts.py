"""`trust add|update|list|remove`: which client may exchange which issuer's tokens for which target."""
from __future__ import annotations

import click

from .. import scopes
from ..clock import utcnow
from ..models import Trust
from .common import (Fail, cli, cli_flag, commit, emit, found, get_target, given_options, json_option, options,
                     pass_ctx, printable, show)
from .tokens import revoke_on_remove


@cli.group()
def trust():
    """Which client may exchange which issuer's tokens for which target."""


_KEY = [
    click.option("--client", "client_id", required=True, metavar="CLIENT_ID", help="The vendor client."),
    click.option("--issuer", "issuer_url", required=True, metavar="ISSUER_URL", help="The EHR's issuer URL."),
    click.option("--target", "target_ref", required=True, metavar="TARGET", help="The target's base URL or name."),
]


def _options(update: bool):
    flag = (lambda name, help_: click.option(f"--{name}/--no-{name}", default=None, help=help_)) if update else \
        (lambda name, help_: click.option(f"--{name}", is_flag=True, default=False, help=help_))
    opts = _KEY + [
        click.option("--scopes", "scope_text", required=not update, metavar='"SCOPES"',
                     help='SMART resource scopes this trust allows at most, e.g. "patient/*.rs".'),
        click.option("--upstream-client-id", required=not update, metavar="ID",
                     help="The app's client_id at the EHR: only tokens issued to it are exchanged."),
        click.option("--max-ttl", type=click.IntRange(1, None), metavar="SECONDS",
                     help="Longest lifetime of tokens minted under this trust."),
        flag("allow-id-token", "Allow the OpenID exchange (the ID token as subject_token)."),
        flag("allow-jwt-grant", "Allow the JWT authorization grant (identity chaining)."),
        click.option("--require-dpop/--no-require-dpop", default=None if update else False,
                     help="Refuse requests under this trust without a DPoP proof (RFC 9449): its tokens are "
                          "DPoP-bound."),
        click.option("--consent", type=click.Choice(["none", "required"]), default=None if update else "none",
                     show_default=not update, help="Whether the user must approve, once, in the browser."),
        click.option("--consent-max-days", type=click.IntRange(1, 3650), default=None if update else 90,
                     show_default=not update, metavar="N", help="Longest a consent may last."),
        click.option("--consent-signer", type=click.Choice(["patient", "any"]),
                     default=None if update else "patient", show_default=not update,
                     help="Who may approve: the patient themself, or any signer whose sub matches "
                          "(e.g. a RelatedPerson)."),
    ]
    if update:
        opts.append(click.option("--no-max-ttl", is_flag=True, help="Remove the lifetime cap."))
    return options(opts)


FLAG = cli_flag({"scope_text": "--scopes"})


def _parse_scopes(text, what):
    try:
        parsed = scopes.parse(text)
    except scopes.ScopeError as e:
        raise Fail(f"{what}: {e}") from None
    dropped = [t for t in text.split() if scopes.parse_scope(t) is None]
    if dropped or not parsed:
        raise Fail(f"{what} must list SMART resource scopes only (e.g. patient/*.rs); "
                   f"not {printable(' '.join(dropped)) or 'empty'}")
    return text.strip()


def apply_options(row: Trust, o: dict, name=FLAG):
    """Validate the given options and set them on row: the one home of each trust
    option's rule (`trust add|update` and `config apply`)."""
    if o.get("scope_text") is not None:
        row.scopes = _parse_scopes(o["scope_text"], name("scope_text"))
    if o.get("upstream_client_id") is not None:
        up = o["upstream_client_id"]
        if not up.strip() or len(up) > 255 or not up.isprintable():
            raise Fail(f"{name('upstream_client_id')} must be 1-255 printable characters")
        row.upstream_client_id = up
    if o.get("max_ttl") is not None:
        row.max_ttl = o["max_ttl"]
    if o.get("no_max_ttl"):
        row.max_ttl = None
    for key in ("allow_id_token", "allow_jwt_grant", "consent", "consent_max_days", "consent_signer", "require_dpop"):
        if o.get(key) is not None:
            setattr(row, key, o[key])


def new_trust(change, c, i, t, o: dict, name=FLAG) -> Trust:
    """`trust add` and `config apply`: a new trust of client c, issuer i and target t,
    added to the change (not committed)."""
    if change.has_trust(c, i, t):
        raise Fail("that trust already exists; change it with `trust update`")
    row = Trust(client_id=c.id, issuer_id=i.id, target_id=t.id, created=utcnow(), require_dpop=False)
    apply_options(row, o, name)
    change.add(row)
    return row


def _find(change, client_id, issuer_url, target_ref):
    c = found(change.client(client_id), "client", client_id)
    i = found(change.issuer(issuer_url), "issuer", issuer_url)
    t = get_target(change, target_ref)
    return c, i, t


@trust.command("add")
@_options(update=False)
@pass_ctx
def trust_add(ctx, client_id, issuer_url, target_ref, **o):
    """Let a client exchange an issuer's tokens for a target, up to some scopes."""
    with ctx.store.admin.change() as change:
        c, i, t = _find(change, client_id, issuer_url, target_ref)
        row = new_trust(change, c, i, t, o)
        commit(ctx, change, "trust.add", f"{client_id} {issuer_url} -> {t.base_url}: {row.scopes}")
        warning = _consent_warning(i, o)
    click.echo(f"trust added: {printable(client_id)} may exchange {printable(issuer_url)} tokens for "
               f"{printable(t.base_url)}")
    if warning:
        click.echo(warning, err=True)


@trust.command("update")
@_options(update=True)
@pass_ctx
def trust_update(ctx, client_id, issuer_url, target_ref, **o):
    """Change a trust: only the options given change."""
    given = given_options(o)
    if not given:
        raise Fail("nothing to change: give at least one option (see `trust update --help`)")
    with ctx.store.admin.change() as change:
        c, i, t = _find(change, client_id, issuer_url, target_ref)
        row = change.trust(c, i, t)
        if row is None:
            raise Fail("no such trust; add it with `trust add`")
        apply_options(row, given)
        commit(ctx, change, "trust.update", f"{client_id} {issuer_url} -> {t.base_url}: {', '.join(sorted(given))}")
        warning = _consent_warning(i, given)
    click.echo("trust updated")
    if warning:
        click.echo(warning, err=True)


def _consent_warning(issuer, o: dict) -> str | None:
    """Consent is signed after signing in at the issuer: without the service's login client
    there, the consent page says sign-in is unavailable and no consent can be given."""
    if o.get("consent") != "required" or issuer.login_client_id:
        return None
    return (f"warning: {printable(issuer.url)} has no login client, so nobody can sign in to give consent and "
            "exchanges under this trust are refused consent_required; add one with `issuer update "
            f"{printable(issuer.url)} --login-client-id ID`")


@trust.command("list")
@click.option("--client", "client_id", metavar="CLIENT_ID", help="Only this client's trusts.")
@json_option
@pass_ctx
def trust_list(ctx, client_id, as_json):
    """List the trusts."""
    with ctx.store.admin.change() as change:
        rows = [trust_row(c, i, t, tr) for c, i, t, tr in change.trusts(client_id)]
    emit(rows, as_json, ["client", "issuer", "target", "scopes", "upstream_client_id"])


def trust_row(client, issuer, target, tr) -> dict:
    return {"client": client, "issuer": issuer, "target": target, "scopes": tr.scopes,
            "upstream_client_id": tr.upstream_client_id, "max_ttl": tr.max_ttl,
            "allow_id_token": bool(tr.allow_id_token), "allow_jwt_grant": bool(tr.allow_jwt_grant),
            "consent": tr.consent, "consent_max_days": tr.consent_max_days, "consent_signer": tr.consent_signer,
            "require_dpop": bool(tr.require_dpop)}


@trust.command("show")
@options(_KEY)
@json_option
@pass_ctx
def trust_show(ctx, client_id, issuer_url, target_ref, as_json):
    """Show one trust (every option)."""
    with ctx.store.admin.change() as change:
        c, i, t = _find(change, client_id, issuer_url, target_ref)
        row = change.trust(c, i, t)
        if row is None:
            raise Fail("no such trust")
        show(trust_row(c.client_id, i.url, t.base_url, row), as_json)


@trust.command("remove")
@options(_KEY)
@pass_ctx
def trust_remove(ctx, client_id, issuer_url, target_ref):
    """Remove one trust."""
    with ctx.store.admin.change() as change:
        c, i, t = _find(change, client_id, issuer_url, target_ref)
        if not change.remove_trust(c, i, t):
            raise Fail("no such trust")
        revoke_on_remove(change, "trust", client_id=client_id, issuer=issuer_url, target=t.base_url)
        commit(ctx, change, "trust.remove", f"{client_id} {issuer_url} -> {t.base_url}")
    click.echo("trust removed")
