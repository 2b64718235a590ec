"""`client add|update|rotate-secret|list|show|remove|disable|enable`: vendor backends."""
from __future__ import annotations

import json

import click

from ..sealing import MIN_SECRET_LENGTH
from ..clock import utcnow
from ..models import Client
from ..sealing import generate_secret, hash_secret
from .common import (Fail, check_id, cli, cli_flag, option_values, commit, emit, found, given_options, json_option,
                     options, pass_ctx, printable, remove_with_trusts, secret_from_env, show, url_arg,
                     yes_option)
from .tokens import revoke_on_remove


@cli.group()
def client():
    """Vendor backends that ask for exchanges."""


_CREDENTIALS = [
    click.option("--secret-env", metavar="VAR",
                 help="Environment variable holding its secret (at least 32 characters; stored hashed)."),
    click.option("--generate-secret", "generate", is_flag=True, default=None,
                 help="Make a new secret and print it once."),
]
_credential_options = options(_CREDENTIALS)


def _options(update: bool):
    listed = " Given in update, replaces the whole list ('' clears it)." if update else ""
    opts = [
        click.option("--jwks-file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Its public keys (JWKS) for private_key_jwt."),
        click.option("--jwks-uri", metavar="URL", help="Where its public keys (JWKS) are published, for "
                                                       "private_key_jwt."),
        click.option("--name", help="Display name, shown to users on the consent page."),
        click.option("--redirect-uri", "redirect_uris", multiple=True, metavar="URI",
                     help="Where the consent flow may send the browser back: an absolute https URI without a "
                          "fragment (http only for loopback) (repeatable)." + listed),
        click.option("--require-dpop/--no-require-dpop", default=None if update else False,
                     help="Refuse its token requests without a DPoP proof (RFC 9449 section 5.2 "
                          "dpop_bound_access_tokens): every token minted for it is DPoP-bound."),
    ]

    return options([*opts, *_CREDENTIALS])


FLAG = cli_flag({"redirect_uris": "--redirect-uri", "generate": "--generate-secret"})
CREDENTIALS = ("secret_env", "generate", "jwks_file", "jwks_uri", "jwks")  # jwks: config apply's inline keys


def credentials(ctx, o, required: bool, name=FLAG):
    """-> ({column: value}, secret to show once or None) for the one credential option given."""
    chosen = [k for k in CREDENTIALS if o.get(k)]
    if len(chosen) > 1 or (required and not chosen):
        raise Fail("give exactly one of --secret-env VAR, --generate-secret, --jwks-file FILE, --jwks-uri URL")
    if not chosen:
        return {}, None
    out = {"auth_method": "client_secret", "secret_salt": None, "secret_hash": None, "jwks": None,
           "jwks_uri": None}
    shown = None
    if o.get("secret_env") or o.get("generate"):
        secret = generate_secret() if o.get("generate") else secret_from_env(
            o["secret_env"], "client secret", name("secret_env"), MIN_SECRET_LENGTH)
        out["secret_salt"], out["secret_hash"] = hash_secret(secret, ctx.sealing_secret())
        shown = secret if o.get("generate") else None
    elif o.get("jwks_file"):
        out["auth_method"] = "private_key_jwt"
        out["jwks"] = _read_public_jwks(o["jwks_file"])
    elif o.get("jwks"):
        out["auth_method"] = "private_key_jwt"
        out["jwks"] = public_jwks(o["jwks"], name("jwks"))
    else:
        out["auth_method"] = "private_key_jwt"
        out["jwks_uri"] = url_arg(o["jwks_uri"], name("jwks_uri"))
    return out, shown


def _read_public_jwks(path):
    what = f"--jwks-file {printable(path)}"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise Fail(f"{what}: not a readable JWKS ({type(e).__name__})") from None
    return public_jwks(data, what)


def public_jwks(data, what: str) -> dict:
    """A JWKS of public keys only, with at least one usable key (``what`` names where it came from)."""
    import jwt
    try:
        if not isinstance(data, dict):
            raise ValueError("not an object")
        keyset = jwt.PyJWKSet.from_dict(data)
    except (ValueError, RecursionError, jwt.PyJWKSetError, jwt.PyJWKError) as e:
        raise Fail(f"{what}: not a readable JWKS ({type(e).__name__})") from None
    for k in data.get("keys", []):
        if any(p in k for p in ("d", "p", "q", "dp", "dq", "qi", "k")):
            raise Fail(f"{what} contains private key material; register public keys only")
    if not keyset.keys:
        raise Fail(f"{what} has no usable keys")
    return {"keys": data["keys"]}


def apply_options(ctx, row: Client, o: dict, name=FLAG):
    """Validate the given options (credentials aside) and set them on row: the one home
    of each client option's rule (`client add|update` and `config apply`)."""
    if o.get("name") is not None:
        value = o["name"].strip()
        if len(value) > 255 or not value.isprintable():
            raise Fail(f"{name('name')} must be at most 255 printable characters")
        row.name = value or None
    if o.get("redirect_uris"):
        row.redirect_uris = [url_arg(u, name("redirect_uris"), https_only_beyond_loopback=True)
                             for u in option_values(o["redirect_uris"])]
    if o.get("require_dpop") is not None:
        row.require_dpop = bool(o["require_dpop"])


def new_client(ctx, change, client_id: str, o: dict, name=FLAG, id_name: str = "CLIENT_ID"):
    """`client add` and `config apply`: check CLIENT_ID, the credential and the options,
    and add the client to the change (not committed) -> (row, secret to show once or None)."""
    check_id(client_id, id_name)
    if ctx.settings.names_service(client_id):
        raise Fail(f"{id_name} must not be this service's issuer URL (the service uses it for its own searches)")
    if change.has_issuer(client_id):
        raise Fail(f"{printable(client_id)} is a registered issuer URL; a client id must not be one")
    creds, shown = credentials(ctx, o, required=True, name=name)
    if change.has_client(client_id):
        raise Fail(f"client {printable(client_id)!r} already exists; change it with `client update`")
    row = Client(client_id=client_id, created=utcnow(), redirect_uris=[], require_dpop=False, **creds)
    apply_options(ctx, row, o, name)
    change.add(row)
    return row, shown


@client.command("add")
@click.argument("client_id")
@_options(update=False)
@pass_ctx
def client_add(ctx, client_id, **o):
    """Register CLIENT_ID with a secret (>= 32 characters) or public keys (private_key_jwt)."""
    with ctx.store.admin.change() as change:
        row, shown = new_client(ctx, change, client_id, o)
        commit(ctx, change, "client.add", client_id)
    click.echo(f"client {printable(client_id)} added ({row.auth_method})")
    if shown:
        click.echo(f"client_secret: {shown}")
        click.echo("Store it now: it is not shown again.", err=True)


@client.command("update")
@click.argument("client_id")
@_options(update=True)
@pass_ctx
def client_update(ctx, client_id, **o):
    """Change CLIENT_ID's settings or credentials: only the options given change."""
    given = given_options(o)
    if not given:
        raise Fail("nothing to change: give at least one option (see `client update --help`)")
    with ctx.store.admin.change() as change:
        row = found(change.client(client_id), "client", client_id)
        creds, shown = credentials(ctx, given, required=False)
        for k, v in creds.items():
            setattr(row, k, v)
        apply_options(ctx, row, given)
        commit(ctx, change, "client.update", f"{client_id}: {', '.join(sorted(given))}")
    click.echo(f"client {printable(client_id)} updated")
    if shown:
        click.echo(f"client_secret: {shown}")
        click.echo("Store it now: it is not shown again.", err=True)


@client.command("rotate-secret")
@click.argument("client_id")
@_credential_options
@pass_ctx
def client_rotate(ctx, client_id, **o):
    """Replace CLIENT_ID's secret; the old one stops working at once."""
    creds, shown = credentials(ctx, o, required=True)
    with ctx.store.admin.change() as change:
        c = found(change.client(client_id), "client", client_id)
        for k, v in creds.items():
            setattr(c, k, v)
        commit(ctx, change, "client.rotate-secret", client_id)
    click.echo(f"client {printable(client_id)} secret replaced")
    if shown:
        click.echo(f"client_secret: {shown}")


def client_row(c: Client) -> dict:
    method = ("private_key_jwt" if c.auth_method == "private_key_jwt"
              else "client_secret_basic,client_secret_post")
    return {"client_id": c.client_id, "name": c.name, "auth_methods": method, "jwks_uri": c.jwks_uri,
            "jwks_kids": [k.get("kid") for k in (c.jwks or {}).get("keys", [])] or None,
            "redirect_uris": c.redirect_uris or [],
            "created": c.created.isoformat() if c.created else None, "disabled": bool(c.disabled),
            "require_dpop": bool(c.require_dpop)}


@client.command("list")
@json_option
@pass_ctx
def client_list(ctx, as_json):
    """List the clients (never their secrets)."""
    with ctx.store.admin.change() as change:
        rows = [client_row(c) for c in change.clients()]
    emit(rows, as_json, ["client_id", "name", "auth_methods", "jwks_uri", "disabled"])


@client.command("show")
@click.argument("client_id")
@json_option
@pass_ctx
def client_show(ctx, client_id, as_json):
    """Show one client (never its secret)."""
    with ctx.store.admin.change() as change:
        show(client_row(found(change.client(client_id), "client", client_id)), as_json)


@client.command("remove")
@click.argument("client_id")
@yes_option
@pass_ctx
def client_remove(ctx, client_id, yes):
    """Remove a client (with --yes, also its trusts); the tokens minted for it are revoked."""
    remove_with_trusts(ctx, client_id, "client", yes,
                       also=lambda change: revoke_on_remove(change, "client", client_id=client_id))


@client.command("disable")
@click.argument("client_id")
@pass_ctx
def client_disable(ctx, client_id):
    """Refuse CLIENT_ID at every endpoint (401 invalid_client) and revoke the tokens
    minted for it, until `client enable`."""
    with ctx.store.admin.change() as change:
        row = found(change.client(client_id), "client", client_id)
        if row.disabled:
            click.echo(f"client {printable(client_id)} is already disabled")
            return
        row.disabled = True
        revoke_on_remove(change, "client", client_id=client_id)
        commit(ctx, change, "client.disable", client_id)
    click.echo(f"client {printable(client_id)} disabled; the tokens minted for it are revoked")


@client.command("enable")
@click.argument("client_id")
@pass_ctx
def client_enable(ctx, client_id):
    """Let a disabled CLIENT_ID ask again (the tokens revoked stay revoked)."""
    with ctx.store.admin.change() as change:
        row = found(change.client(client_id), "client", client_id)
        if not row.disabled:
            click.echo(f"client {printable(client_id)} is not disabled")
            return
        row.disabled = False
        commit(ctx, change, "client.enable", client_id)
    click.echo(f"client {printable(client_id)} enabled")
