"""`db upgrade|downgrade` and `serve`."""
from __future__ import annotations

import os

import click
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from .. import keys as keymod
from ..models import SigningKey
from ..sealing import seal
from ..store import utcnow
from .common import Ctx, cli, commit, pass_ctx


@cli.group()
def db():
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="The schema revision to reach.")
@pass_ctx
def db_upgrade(ctx, revision):
    """Create or upgrade the schema; make the first signing key if there is none."""
    from ..db import upgrade
    upgrade(ctx.engine, revision)
    if revision == "head":
        ensure_signing_key(ctx)
    click.echo("database is at the current schema")


@db.command("downgrade")
@click.argument("revision")
@pass_ctx
def db_downgrade(ctx, revision):
    """Downgrade the schema to REVISION (e.g. base: drops everything)."""
    from ..db import downgrade
    downgrade(ctx.engine, revision)
    click.echo(f"database downgraded to {revision}")


def ensure_signing_key(ctx: Ctx):
    with ctx.store.session() as s:
        if s.execute(select(SigningKey.id).where(SigningKey.state == "active")).first() is None:
            new_key(s, ctx, "active")
            commit(ctx, s, "keys.create", "first signing key")


def new_key(session, ctx, state, alg=keymod.DEFAULT_ALG):
    kid, pem, jwk = keymod.generate(alg)
    now = utcnow()
    row = SigningKey(kid=kid, alg=alg, state=state, private_key=seal(pem, ctx.settings.key_secret),
                     public_jwk=jwk, created=now, activated=now if state == "active" else None)
    session.add(row)
    return row


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--workers", default=None, type=click.IntRange(1, 64),
              help="Worker processes (default: the number of cores).")
@pass_ctx
def serve(ctx, host, port, workers):
    """Run the service under gunicorn (graceful shutdown on SIGTERM).

    Creates or upgrades the schema and the first signing key when needed.
    """
    from ..db import is_current, upgrade
    try:
        if not is_current(ctx.engine):
            upgrade(ctx.engine)
        ensure_signing_key(ctx)
    except OperationalError:
        click.echo("warning: the database is unreachable; serving 503 until it returns", err=True)
    from ..wsgi_server import run
    run(host, port, workers or os.cpu_count() or 2)
