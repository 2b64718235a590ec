"""`db upgrade|downgrade` and `serve`."""
from __future__ import annotations

import logging
import os

import click
from sqlalchemy.exc import OperationalError

from .. import keys as keymod
from ..clock import utcnow
from ..models import SigningKey
from ..sealing import seal
from .common import Ctx, Fail, cli, commit, is_loopback, pass_ctx, printable

log = logging.getLogger("token_exchange.server")


@cli.group()
def db():
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="The schema revision to reach.")
@pass_ctx
def db_upgrade(ctx, revision):
    """Create or upgrade the schema; make the first signing key if there is none."""
    from ..db import current_revision, revisions, upgrade
    known = _known(ctx, revisions)
    if revision != "head" and revision not in known:
        raise Fail(f"unknown revision {printable(revision)!r}; the known ones: {', '.join(known)}")
    before = current_revision(ctx.engine)
    upgrade(ctx.engine, revision)
    after = current_revision(ctx.engine)
    if revision == "head":
        ensure_signing_key(ctx)
    head = known[-1]
    if before == after:
        click.echo(f"database is at {'the current schema' if after == head else 'revision'} ({after}); "
                   "nothing to do")
    else:
        click.echo(f"database upgraded from {before or 'an empty database'} to {after}"
                   + (" (the current schema)" if after == head else ""))


@db.command("downgrade")
@click.argument("revision")
@pass_ctx
def db_downgrade(ctx, revision):
    """Downgrade the schema to REVISION (e.g. base: drops everything)."""
    from ..db import current_revision, downgrade, revisions
    known = ["base"] + _known(ctx, revisions)
    if revision not in known:
        raise Fail(f"unknown revision {printable(revision)!r}; the known ones: {', '.join(known)}")
    before = current_revision(ctx.engine)
    downgrade(ctx.engine, revision)
    click.echo(f"database downgraded from {before or 'an empty database'} to {revision}")


@db.command("current")
@pass_ctx
def db_current(ctx):
    """The database's schema revision, and whether it is the current one."""
    from ..db import current_revision, revisions
    head = _known(ctx, revisions)[-1]
    rev = current_revision(ctx.engine)
    if rev is None:
        click.echo("an empty database (no schema): run `token-exchange db upgrade`")
    elif rev == head:
        click.echo(f"{rev} (the current schema)")
    else:
        click.echo(f"{rev} (the current schema is {head}: run `token-exchange db upgrade`)")


@db.command("history")
@pass_ctx
def db_history(ctx):
    """The schema revisions, oldest first; the database's own is marked."""
    from ..db import current_revision, revisions
    rev = current_revision(ctx.engine)
    for name, doc in revisions(ctx.engine):
        click.echo(f"{name}  {doc}" + ("  (this database)" if name == rev else ""))


def _known(ctx, revisions) -> list:
    return [name for name, _ in revisions(ctx.engine)]


def ensure_signing_key(ctx: Ctx):
    with ctx.store.admin.change() as change:
        if change.active_key_alg() is None:
            new_key(change, ctx, "active")
            commit(ctx, change, "keys.create", "first signing key")


def new_key(change, ctx, state, alg=keymod.DEFAULT_ALG):
    kid, pem, jwk = keymod.generate(alg)
    now = utcnow()
    row = SigningKey(kid=kid, alg=alg, state=state, private_key=seal(pem, ctx.sealing_secret()),
                     public_jwk=jwk, created=now, activated=now if state == "active" else None)
    change.add(row)
    return row


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--workers", default=None, type=click.IntRange(1, 64),
              help="Worker processes (default: the number of cores).")
def serve(host, port, workers):
    """Run the service under gunicorn (graceful shutdown on SIGTERM).

    Creates or upgrades the schema and the first signing key when needed.
    """
    from .. import logs
    from ..db import is_current, upgrade
    logs.configure(server=True)  # every line serve writes is JSON, from the first (before the database is opened)
    ctx = click.get_current_context().ensure_object(Ctx)
    try:
        if not is_current(ctx.engine):
            upgrade(ctx.engine)
        ensure_signing_key(ctx)
        unsealable = ctx.store.config().unsealable
    except OperationalError:
        click.echo("warning: the database is unreachable; serving 503 until it returns", err=True)
        unsealable = ()
    if unsealable:
        raise Fail(f"TOKEN_EXCHANGE_KEY_SECRET cannot unseal {len(unsealable)} stored key(s) or secret(s) "
                   f"({', '.join(unsealable[:3])}): start with the key secret they were sealed under")
    _check_port_free(host, port)
    for warning in serve_warnings(ctx, host, port):
        log.warning(warning)
    from ..wsgi_server import run
    run(host, port, workers or os.cpu_count() or 2, ctx.settings)


def _check_port_free(host: str, port: int) -> None:
    """One line, before gunicorn starts, when the address cannot be listened on."""
    import socket
    try:
        socket.create_server((host, port)).close()
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else type(e).__name__
        raise Fail(f"cannot listen on {host}:{port}: {reason[:1].lower() + reason[1:]}") from None


def serve_warnings(ctx, host: str, port: int) -> list[str]:
    """Settings that work but are probably not what the operator meant, or unsafe."""
    from urllib.parse import urlsplit

    from ..sealing import SEALED_PREFIX
    s = ctx.settings
    issuer = urlsplit(s.issuer)
    out = []
    issuer_port = issuer.port or (443 if issuer.scheme == "https" else 80)
    if issuer_port != port and (is_loopback(issuer.hostname or "") or issuer.hostname == host):
        out.append(f"the issuer URL {s.issuer} names port {issuer_port} but the service listens on {port}: "
                   "metadata, jwks_uri and assertion audiences will point elsewhere; set TOKEN_EXCHANGE_ISSUER")
    if issuer.scheme == "http" and not is_loopback(host):
        out.append(f"listening on {host} beyond loopback with an http issuer ({s.issuer}): tokens and secrets "
                   "cross the network in clear; put TLS in front and use an https issuer")
    if not s.key_secret:
        out.append("TOKEN_EXCHANGE_KEY_SECRET is not set: the signing key and outbound secrets are stored "
                   "unencrypted in the database; anyone who can read it can mint tokens")
    else:
        try:
            with ctx.store.admin.change() as change:
                unsealed = [what for what, row, attr in change.sealed()
                            if not getattr(row, attr).startswith(SEALED_PREFIX)]
        except OperationalError:
            unsealed = []
        if unsealed:
            out.append(f"{len(unsealed)} stored key(s) or secret(s) ({', '.join(unsealed[:3])}) were stored before "
                       "TOKEN_EXCHANGE_KEY_SECRET was set and sit unencrypted: run `token-exchange keys reseal`")
    return out
