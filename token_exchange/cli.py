"""The `token-exchange` admin CLI: one click group per noun.

Every failure exits non-zero with one line on stderr and changes nothing.
Secrets come from environment variables (never the command line) and are
never printed, except a generated client secret, once.
"""
from __future__ import annotations

import csv
import getpass
import json
import os
import sys
from datetime import datetime, timezone
from urllib.parse import urlsplit

import click
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from . import keys as keymod
from . import scopes, urns
from .models import Client, Issuer, PatientLink, SigningKey, Target, Trust
from .sealing import generate_secret, hash_secret, seal
from .store import Store, utcnow


class Fail(click.ClickException):
    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


class Ctx:
    def __init__(self):
        from .db import make_engine
        from .settings import Settings, SettingsError
        try:
            self.settings = Settings.from_env(instance_path=_instance_path())
        except SettingsError as e:
            raise Fail(str(e)) from None
        self.engine = make_engine(self.settings.database_url)
        from .shared import Accelerator
        self.accel = Accelerator(self.settings.redis_url, self.settings.database_url, self.settings.redis_prefix)
        self.store = Store(self.engine, self.settings, self.accel)
        self.actor = os.environ.get("TOKEN_EXCHANGE_ADMIN") or _whoami()
        click_ctx = click.get_current_context(silent=True)
        if click_ctx is not None:
            click_ctx.call_on_close(self.engine.dispose)  # no connection outlives the command

    def announce(self):
        """Tell running workers (through Redis, when configured) to reload now."""
        self.accel.publish_change()


def _whoami():
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return f"uid:{os.getuid()}"


def _instance_path():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "instance")


pass_ctx = click.make_pass_decorator(Ctx, ensure=True)


def url_arg(value: str, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment or "#" in value \
            or any(c.isspace() for c in value):
        raise Fail(f"{what} must be an absolute http(s) URL without a fragment: {value!r}")
    return value


def secret_from_env(var: str, what: str, min_len: int = 0) -> str:
    value = os.environ.get(var)
    if not value:
        raise Fail(f"environment variable {var} (the {what}) is not set or empty")
    if len(value) < min_len:
        raise Fail(f"the {what} in {var} is shorter than {min_len} characters; use a high-entropy secret")
    return value


def emit(rows, as_json, columns):
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("(none)")
        return
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        click.echo("  ".join(_cell(r.get(c)).ljust(widths[c]) for c in columns).rstrip())


def _cell(v):
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def commit(ctx: Ctx, session, action: str, detail: str):
    ctx.store.bump(session, ctx.actor, action, detail)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Fail(f"{action}: conflicts with an existing record ({detail})") from None
    ctx.announce()


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _OneLineErrors(click.Group):
    """Click's usage errors (missing option, bad choice, unknown command) print the
    usage and a hint too; here they are one `error:` line like every other failure."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as e:  # a bare group: its help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}".replace("\n", " "), err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Administer the token-exchange service (RFC 8693 for SMART on FHIR)."""


def main():
    try:
        cli(standalone_mode=True)
    except OperationalError as e:
        click.echo(f"error: the database is unreachable ({type(e.orig).__name__ if e.orig else 'OperationalError'})",
                   err=True)
        sys.exit(1)


# -- db ----------------------------------------------------------------------
@cli.group()
def db():
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@pass_ctx
def db_upgrade(ctx, revision):
    """Create or upgrade the schema; make the first signing key if there is none."""
    from .db import upgrade
    upgrade(ctx.engine, revision)
    if revision == "head":
        ensure_signing_key(ctx)
    click.echo("database is at the current schema")


@db.command("downgrade")
@click.argument("revision")
@pass_ctx
def db_downgrade(ctx, revision):
    """Downgrade the schema to REVISION (e.g. base)."""
    from .db import downgrade
    downgrade(ctx.engine, revision)
    click.echo(f"database downgraded to {revision}")


def ensure_signing_key(ctx: Ctx):
    with ctx.store.session() as s:
        if s.execute(select(SigningKey.id).where(SigningKey.state == "active")).first() is None:
            _new_key(s, ctx, "active")
            commit(ctx, s, "keys.create", "first signing key")


def _new_key(session, ctx, state, alg=keymod.DEFAULT_ALG):
    kid, pem, jwk = keymod.generate(alg)
    now = utcnow()
    row = SigningKey(kid=kid, alg=alg, state=state, private_key=seal(pem, ctx.settings.key_secret),
                     public_jwk=jwk, created=now, activated=now if state == "active" else None)
    session.add(row)
    return row


# -- serve -------------------------------------------------------------------
@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=None, type=click.IntRange(1, 64), help="default: the number of cores")
@pass_ctx
def serve(ctx, host, port, workers):
    """Run the service under gunicorn (graceful shutdown on SIGTERM)."""
    from .db import is_current, upgrade
    try:
        if not is_current(ctx.engine):
            upgrade(ctx.engine)
        ensure_signing_key(ctx)
    except OperationalError:
        click.echo("warning: the database is unreachable; serving 503 until it returns", err=True)
    from .wsgi_server import run
    run(host, port, workers or os.cpu_count() or 2)


# -- issuer ------------------------------------------------------------------
@cli.group()
def issuer():
    """Trusted source authorization servers (EHRs)."""


@issuer.command("add")
@click.argument("issuer_url")
@click.option("--jwks-uri")
@click.option("--discover", is_flag=True, help="read jwks_uri (and introspection) from discovery")
@click.option("--source", "sources", multiple=True, help="a FHIR base URL it may vouch for (repeatable)")
@click.option("--audience", "audiences", multiple=True, help="another accepted access-token aud")
@click.option("--algs", default=",".join(urns.DEFAULT_ISSUER_ALGS), show_default=True)
@click.option("--patient-claim", default="patient", show_default=True)
@click.option("--source-claim", default="source", show_default=True)
@click.option("--introspection-endpoint")
@click.option("--introspection-client-id")
@click.option("--introspection-secret-env", metavar="VAR")
@pass_ctx
def issuer_add(ctx, issuer_url, jwks_uri, discover, sources, audiences, algs, patient_claim, source_claim,
               introspection_endpoint, introspection_client_id, introspection_secret_env):
    """Trust ISSUER_URL (its exact iss) as a source authorization server."""
    url_arg(issuer_url, "ISSUER_URL")
    if introspection_endpoint is not None:
        url_arg(introspection_endpoint, "--introspection-endpoint")
    if bool(jwks_uri) == bool(discover):
        raise Fail("give exactly one of --jwks-uri URL or --discover")
    if discover:
        from .issuers import discover as do_discover
        try:
            doc = do_discover(issuer_url, ctx.settings.http_timeout)
        except ValueError as e:
            raise Fail(str(e)) from None
        jwks_uri = doc["jwks_uri"]
        introspection_endpoint = introspection_endpoint or doc.get("introspection_endpoint")
    url_arg(jwks_uri, "--jwks-uri")
    if not sources:
        raise Fail("give at least one --source FHIR_BASE the issuer may vouch for")
    for s in sources:
        url_arg(s, "--source")
    alg_list = [a.strip() for a in algs.split(",") if a.strip()]
    bad = [a for a in alg_list if a not in urns.ASYMMETRIC_ALGS]
    if not alg_list or bad:
        raise Fail(f"--algs must list asymmetric algorithms from {','.join(urns.ASYMMETRIC_ALGS)}; not {','.join(bad) or 'empty'}")
    secret = None
    if introspection_secret_env or introspection_client_id:
        if not (introspection_endpoint and introspection_client_id and introspection_secret_env):
            raise Fail("introspection needs --introspection-endpoint, --introspection-client-id and --introspection-secret-env")
    if introspection_endpoint:
        url_arg(introspection_endpoint, "--introspection-endpoint")
    if introspection_secret_env:
        secret = seal(secret_from_env(introspection_secret_env, "introspection secret"), ctx.settings.key_secret)
    with ctx.store.session() as s:
        if s.execute(select(Issuer.id).where(Issuer.url == issuer_url)).first():
            raise Fail(f"issuer {issuer_url} already exists; remove it first")
        s.add(Issuer(url=issuer_url, jwks_uri=jwks_uri, algs=alg_list, sources=list(dict.fromkeys(sources)),
                     audiences=list(dict.fromkeys(audiences)), patient_claim=patient_claim,
                     source_claim=source_claim, introspection_endpoint=introspection_endpoint,
                     introspection_client_id=introspection_client_id if introspection_endpoint else None,
                     introspection_secret=secret, created=utcnow()))
        commit(ctx, s, "issuer.add", issuer_url)
    click.echo(f"issuer {issuer_url} added")


def _issuer_row(i: Issuer) -> dict:
    return {"issuer": i.url, "jwks_uri": i.jwks_uri, "algs": i.algs, "sources": i.sources,
            "audiences": i.audiences, "patient_claim": i.patient_claim, "source_claim": i.source_claim,
            "introspection_endpoint": i.introspection_endpoint,
            "introspection_client_id": i.introspection_client_id,
            "introspection_secret": "set" if i.introspection_secret else None}


@issuer.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def issuer_list(ctx, as_json):
    with ctx.store.session() as s:
        rows = [_issuer_row(i) for i in s.scalars(select(Issuer).order_by(Issuer.url))]
    emit(rows, as_json, ["issuer", "jwks_uri", "sources", "algs"])


@issuer.command("show")
@click.argument("issuer_url")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def issuer_show(ctx, issuer_url, as_json):
    with ctx.store.session() as s:
        i = _get(s, Issuer, Issuer.url, issuer_url, "issuer")
        _show(_issuer_row(i), as_json)


@issuer.command("remove")
@click.argument("issuer_url")
@pass_ctx
def issuer_remove(ctx, issuer_url):
    """Remove an issuer and every trust that names it."""
    with ctx.store.session() as s:
        i = _get(s, Issuer, Issuer.url, issuer_url, "issuer")
        s.execute(delete(Trust).where(Trust.issuer_id == i.id))
        s.delete(i)
        commit(ctx, s, "issuer.remove", issuer_url)
    click.echo(f"issuer {issuer_url} removed")


def _get(session, model, column, value, what):
    row = session.scalars(select(model).where(column == value)).first()
    if row is None:
        raise Fail(f"no {what} {value!r}")
    return row


def _show(row, as_json):
    if as_json:
        click.echo(json.dumps(row, indent=2, default=str))
    else:
        for k, v in row.items():
            click.echo(f"{k}: {_cell(v)}")


# -- target ------------------------------------------------------------------
@cli.group()
def target():
    """Target FHIR servers that accept minted tokens."""


@target.command("add")
@click.argument("base_url")
@click.option("--name")
@click.option("--max-ttl", type=click.IntRange(1, None), metavar="SECONDS")
@click.option("--introspection-secret-env", metavar="VAR", help="the target's secret for /introspect")
@pass_ctx
def target_add(ctx, base_url, name, max_ttl, introspection_secret_env):
    """Register BASE_URL (the aud of tokens minted for it)."""
    url_arg(base_url, "BASE_URL")
    salt = digest = None
    if introspection_secret_env:
        if not name:
            raise Fail("a target that introspects needs --name (its HTTP Basic user name)")
        salt, digest = hash_secret(secret_from_env(introspection_secret_env, "target secret", urns.MIN_SECRET_LENGTH),
                                   ctx.settings.key_secret)
    with ctx.store.session() as s:
        if s.execute(select(Target.id).where(Target.base_url == base_url)).first():
            raise Fail(f"target {base_url} already exists")
        if name and s.execute(select(Target.id).where(Target.name == name)).first():
            raise Fail(f"a target named {name!r} already exists")
        s.add(Target(base_url=base_url, name=name, max_ttl=max_ttl, secret_salt=salt, secret_hash=digest,
                     created=utcnow()))
        commit(ctx, s, "target.add", base_url)
    click.echo(f"target {base_url} added")


def _target_row(t: Target) -> dict:
    return {"base_url": t.base_url, "name": t.name, "max_ttl": t.max_ttl,
            "introspection_secret": "set" if t.secret_hash else None}


@target.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def target_list(ctx, as_json):
    with ctx.store.session() as s:
        rows = [_target_row(t) for t in s.scalars(select(Target).order_by(Target.base_url))]
    emit(rows, as_json, ["base_url", "name", "max_ttl"])


@target.command("show")
@click.argument("base_url")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def target_show(ctx, base_url, as_json):
    with ctx.store.session() as s:
        _show(_target_row(_get(s, Target, Target.base_url, base_url, "target")), as_json)


@target.command("remove")
@click.argument("base_url")
@pass_ctx
def target_remove(ctx, base_url):
    """Remove a target with its trusts and patient links."""
    with ctx.store.session() as s:
        t = _get(s, Target, Target.base_url, base_url, "target")
        s.execute(delete(Trust).where(Trust.target_id == t.id))
        s.execute(delete(PatientLink).where(PatientLink.target_id == t.id))
        s.delete(t)
        commit(ctx, s, "target.remove", base_url)
    click.echo(f"target {base_url} removed")


# -- client ------------------------------------------------------------------
@cli.group()
def client():
    """Vendor backends that ask for exchanges."""


def _client_credentials(ctx, secret_env, generate, jwks_file, jwks_uri):
    chosen = [x for x in (secret_env, generate, jwks_file, jwks_uri) if x]
    if len(chosen) != 1:
        raise Fail("give exactly one of --secret-env VAR, --generate-secret, --jwks-file FILE, --jwks-uri URL")
    out = {"auth_method": "client_secret", "secret_salt": None, "secret_hash": None, "jwks": None,
           "jwks_uri": None}
    shown = None
    if secret_env or generate:
        secret = generate_secret() if generate else secret_from_env(secret_env, "client secret",
                                                                    urns.MIN_SECRET_LENGTH)
        out["secret_salt"], out["secret_hash"] = hash_secret(secret, ctx.settings.key_secret)
        shown = secret if generate else None
    elif jwks_file:
        out["auth_method"] = "private_key_jwt"
        out["jwks"] = _read_public_jwks(jwks_file)
    else:
        out["auth_method"] = "private_key_jwt"
        out["jwks_uri"] = url_arg(jwks_uri, "--jwks-uri")
    return out, shown


def _read_public_jwks(path):
    import jwt
    try:
        with open(path) as f:
            data = json.load(f)
        keyset = jwt.PyJWKSet.from_dict(data)
    except (OSError, ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as e:
        raise Fail(f"--jwks-file {path}: not a readable JWKS ({type(e).__name__})") from None
    for k in data.get("keys", []):
        if any(p in k for p in ("d", "p", "q", "dp", "dq", "qi", "k")):
            raise Fail(f"--jwks-file {path} contains private key material; register public keys only")
    if not keyset.keys:
        raise Fail(f"--jwks-file {path} has no usable keys")
    return {"keys": data["keys"]}


@client.command("add")
@click.argument("client_id")
@click.option("--secret-env", metavar="VAR")
@click.option("--generate-secret", "generate", is_flag=True)
@click.option("--jwks-file", type=click.Path(dir_okay=False))
@click.option("--jwks-uri")
@pass_ctx
def client_add(ctx, client_id, secret_env, generate, jwks_file, jwks_uri):
    """Register CLIENT_ID with a secret (>= 32 chars) or public keys (private_key_jwt)."""
    if not client_id or len(client_id) > 255 or any(c.isspace() for c in client_id):
        raise Fail("CLIENT_ID must be 1-255 characters without spaces")
    creds, shown = _client_credentials(ctx, secret_env, generate, jwks_file, jwks_uri)
    with ctx.store.session() as s:
        if s.execute(select(Client.id).where(Client.client_id == client_id)).first():
            raise Fail(f"client {client_id!r} already exists")
        s.add(Client(client_id=client_id, created=utcnow(), **creds))
        commit(ctx, s, "client.add", client_id)
    click.echo(f"client {client_id} added ({creds['auth_method']})")
    if shown:
        click.echo(f"client_secret: {shown}")
        click.echo("Store it now: it is not shown again.", err=True)


@client.command("rotate-secret")
@click.argument("client_id")
@click.option("--secret-env", metavar="VAR")
@click.option("--generate-secret", "generate", is_flag=True)
@pass_ctx
def client_rotate(ctx, client_id, secret_env, generate):
    """Replace CLIENT_ID's secret; the old one stops working at once."""
    creds, shown = _client_credentials(ctx, secret_env, generate, None, None)
    with ctx.store.session() as s:
        c = _get(s, Client, Client.client_id, client_id, "client")
        for k, v in creds.items():
            setattr(c, k, v)
        commit(ctx, s, "client.rotate-secret", client_id)
    click.echo(f"client {client_id} secret replaced")
    if shown:
        click.echo(f"client_secret: {shown}")


def _client_row(c: Client) -> dict:
    method = ("private_key_jwt" if c.auth_method == "private_key_jwt"
              else "client_secret_basic,client_secret_post")
    return {"client_id": c.client_id, "auth_methods": method, "jwks_uri": c.jwks_uri,
            "jwks_kids": [k.get("kid") for k in (c.jwks or {}).get("keys", [])] or None,
            "created": c.created.isoformat() if c.created else None}


@client.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def client_list(ctx, as_json):
    with ctx.store.session() as s:
        rows = [_client_row(c) for c in s.scalars(select(Client).order_by(Client.client_id))]
    emit(rows, as_json, ["client_id", "auth_methods", "jwks_uri"])


@client.command("show")
@click.argument("client_id")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def client_show(ctx, client_id, as_json):
    with ctx.store.session() as s:
        _show(_client_row(_get(s, Client, Client.client_id, client_id, "client")), as_json)


@client.command("remove")
@click.argument("client_id")
@pass_ctx
def client_remove(ctx, client_id):
    with ctx.store.session() as s:
        c = _get(s, Client, Client.client_id, client_id, "client")
        s.execute(delete(Trust).where(Trust.client_id == c.id))
        s.delete(c)
        commit(ctx, s, "client.remove", client_id)
    click.echo(f"client {client_id} removed")


# -- trust -------------------------------------------------------------------
@cli.group()
def trust():
    """Which client may exchange which issuer's tokens for which target."""


@trust.command("add")
@click.option("--client", "client_id", required=True)
@click.option("--issuer", "issuer_url", required=True)
@click.option("--target", "target_url", required=True)
@click.option("--scopes", "scope_text", required=True, help='e.g. "patient/*.rs"')
@click.option("--upstream-client-id", required=True, help="the app's client_id at the EHR")
@click.option("--max-ttl", type=click.IntRange(1, None), metavar="SECONDS")
@click.option("--allow-id-token", is_flag=True, help="allow the OpenID exchange form")
@pass_ctx
def trust_add(ctx, client_id, issuer_url, target_url, scope_text, upstream_client_id, max_ttl, allow_id_token):
    try:
        parsed = scopes.parse(scope_text)
    except scopes.ScopeError as e:
        raise Fail(f"--scopes: {e}") from None
    dropped = [t for t in scope_text.split() if scopes.parse_scope(t) is None]
    if dropped or not parsed:
        raise Fail("--scopes must list SMART resource scopes only (e.g. patient/*.rs); "
                   f"not {' '.join(dropped) or 'empty'}")
    if not upstream_client_id.strip():
        raise Fail("--upstream-client-id must not be empty")
    with ctx.store.session() as s:
        c = _get(s, Client, Client.client_id, client_id, "client")
        i = _get(s, Issuer, Issuer.url, issuer_url, "issuer")
        t = _get(s, Target, Target.base_url, target_url, "target")
        if s.execute(select(Trust.id).where(Trust.client_id == c.id, Trust.issuer_id == i.id,
                                            Trust.target_id == t.id)).first():
            raise Fail("that trust already exists; remove it first to change it")
        s.add(Trust(client_id=c.id, issuer_id=i.id, target_id=t.id, scopes=scope_text.strip(),
                    upstream_client_id=upstream_client_id, max_ttl=max_ttl, allow_id_token=allow_id_token,
                    created=utcnow()))
        commit(ctx, s, "trust.add", f"{client_id} {issuer_url} -> {target_url}: {scope_text}")
    click.echo(f"trust added: {client_id} may exchange {issuer_url} tokens for {target_url}")


@trust.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def trust_list(ctx, as_json):
    with ctx.store.session() as s:
        q = (select(Client.client_id, Issuer.url, Target.base_url, Trust)
             .join(Client, Trust.client_id == Client.id).join(Issuer, Trust.issuer_id == Issuer.id)
             .join(Target, Trust.target_id == Target.id).order_by(Client.client_id, Issuer.url, Target.base_url))
        rows = [{"client": c, "issuer": i, "target": t, "scopes": tr.scopes,
                 "upstream_client_id": tr.upstream_client_id, "max_ttl": tr.max_ttl,
                 "allow_id_token": bool(tr.allow_id_token)} for c, i, t, tr in s.execute(q)]
    emit(rows, as_json, ["client", "issuer", "target", "scopes", "upstream_client_id"])


@trust.command("remove")
@click.option("--client", "client_id", required=True)
@click.option("--issuer", "issuer_url", required=True)
@click.option("--target", "target_url", required=True)
@pass_ctx
def trust_remove(ctx, client_id, issuer_url, target_url):
    with ctx.store.session() as s:
        c = _get(s, Client, Client.client_id, client_id, "client")
        i = _get(s, Issuer, Issuer.url, issuer_url, "issuer")
        t = _get(s, Target, Target.base_url, target_url, "target")
        n = s.execute(delete(Trust).where(Trust.client_id == c.id, Trust.issuer_id == i.id,
                                          Trust.target_id == t.id)).rowcount
        if not n:
            raise Fail("no such trust")
        commit(ctx, s, "trust.remove", f"{client_id} {issuer_url} -> {target_url}")
    click.echo("trust removed")


# -- link --------------------------------------------------------------------
@cli.group()
def link():
    """Patient links: (source FHIR base, patient) -> (target, target patient)."""


def _check_id(value, what):
    if not value or len(value) > 255 or any(c.isspace() for c in value):
        raise Fail(f"{what} must be 1-255 characters without spaces: {value!r}")
    return value


@link.command("add")
@click.option("--source", required=True)
@click.option("--patient", required=True)
@click.option("--target", "target_url", required=True)
@click.option("--target-patient", required=True)
@pass_ctx
def link_add(ctx, source, patient, target_url, target_patient):
    url_arg(source, "--source")
    _check_id(patient, "--patient")
    _check_id(target_patient, "--target-patient")
    with ctx.store.session() as s:
        t = _get(s, Target, Target.base_url, target_url, "target")
        if s.execute(select(PatientLink.id).where(PatientLink.source == source, PatientLink.patient == patient,
                                                  PatientLink.target_id == t.id)).first():
            raise Fail(f"a link for patient {patient} at {source} to {target_url} already exists")
        s.add(PatientLink(source=source, patient=patient, target_id=t.id, target_patient=target_patient))
        commit(ctx, s, "link.add", f"{source} {patient} -> {target_url} {target_patient}")
    click.echo("link added")


LINK_HEADER = ["source", "patient", "target", "target_patient"]


@link.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@pass_ctx
def link_import(ctx, file):
    """Import links from a CSV with header source,patient,target,target_patient (all or nothing)."""
    with ctx.store.session() as s:
        targets = {t.base_url: t.id for t in s.scalars(select(Target))}
    try:
        total = _import_links(ctx, file, targets)
    except UnicodeDecodeError:
        raise Fail(f"{file}: not UTF-8 text") from None
    except csv.Error as e:
        raise Fail(f"{file}: not a readable CSV ({e})") from None
    click.echo(f"imported {total} links")


def _import_links(ctx, file, targets):
    seen = {}  # (source, target id) -> the patients in the file so far: one string per row, not a tuple
    batch, total = [], 0
    with open(file, newline="", encoding="utf-8-sig") as f, ctx.engine.begin() as conn:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != LINK_HEADER:
            raise Fail(f"{file}: the first line must be {','.join(LINK_HEADER)}")
        for n, row in enumerate(reader, start=2):
            if len(row) != 4:
                raise Fail(f"{file}:{n}: expected 4 fields, found {len(row)}")
            source, patient, target_url, target_patient = row
            tid = targets.get(target_url)
            if tid is None:
                raise Fail(f"{file}:{n}: unknown target {target_url!r}")
            try:
                url_arg(source, "source")
                _check_id(patient, "patient")
                _check_id(target_patient, "target_patient")
            except Fail as e:
                raise Fail(f"{file}:{n}: {e.message}") from None
            patients = seen.get((source, tid))
            if patients is None:
                patients = seen[(source, tid)] = set()
            elif patient in patients:
                raise Fail(f"{file}:{n}: duplicate link for patient {patient!r} at {source}")
            patients.add(patient)
            batch.append({"source": source, "patient": patient, "target_id": tid, "target_patient": target_patient})
            if len(batch) >= 20000:
                total += _insert_links(conn, batch, file)
                batch = []
        total += _insert_links(conn, batch, file)
        Store.bump_conn(conn, ctx.actor, "link.import", f"{total} links from {os.path.basename(file)}")
    return total


def _insert_links(conn, batch, file):
    """One batch inside the import's transaction: COPY on PostgreSQL (a million rows
    in seconds), executemany elsewhere."""
    if not batch:
        return 0
    try:
        with conn.begin_nested():
            if conn.dialect.name == "postgresql":
                raw = conn.connection.driver_connection
                with raw.cursor() as cur, cur.copy(
                        "COPY patient_link (source, patient, target_id, target_patient) FROM STDIN") as copy:
                    for row in batch:
                        copy.write_row((row["source"], row["patient"], row["target_id"], row["target_patient"]))
            else:
                conn.execute(insert(PatientLink), batch)
    except Exception as e:  # IntegrityError, or the driver's own from COPY
        if isinstance(e, IntegrityError) or type(e).__name__ in ("UniqueViolation", "IntegrityError"):
            raise Fail(f"{file}: a link in the file already exists in the database; nothing was imported") from None
        raise
    return len(batch)


def _link_query(source=None, target_url=None):
    q = (select(PatientLink.source, PatientLink.patient, Target.base_url, PatientLink.target_patient)
         .join(Target, PatientLink.target_id == Target.id).order_by(PatientLink.id))
    if source:
        q = q.where(PatientLink.source == source)
    if target_url:
        q = q.where(Target.base_url == target_url)
    return q


@link.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@pass_ctx
def link_export(ctx, file):
    """Write all links as CSV to FILE (default: standard output)."""
    try:
        out = open(file, "w", newline="", encoding="utf-8") if file else sys.stdout
    except OSError as e:
        raise Fail(f"cannot write {file}: {e.strerror}") from None
    try:
        w = csv.writer(out)
        w.writerow(LINK_HEADER)
        with ctx.engine.connect() as conn:
            for row in conn.execution_options(stream_results=True, yield_per=10000).execute(_link_query()):
                w.writerow(row)
    finally:
        if file:
            out.close()


@link.command("list")
@click.option("--source")
@click.option("--target", "target_url")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def link_list(ctx, source, target_url, as_json):
    with ctx.engine.connect() as conn:
        rows = [dict(zip(LINK_HEADER, r)) for r in conn.execute(_link_query(source, target_url))]
    emit(rows, as_json, LINK_HEADER)


@link.command("remove")
@click.option("--source", required=True)
@click.option("--patient", required=True)
@click.option("--target", "target_url", required=True)
@pass_ctx
def link_remove(ctx, source, patient, target_url):
    with ctx.store.session() as s:
        t = _get(s, Target, Target.base_url, target_url, "target")
        n = s.execute(delete(PatientLink).where(PatientLink.source == source, PatientLink.patient == patient,
                                                PatientLink.target_id == t.id)).rowcount
        if not n:
            raise Fail("no such link")
        commit(ctx, s, "link.remove", f"{source} {patient} -> {target_url}")
    click.echo("link removed")


# -- keys --------------------------------------------------------------------
@cli.group()
def keys():
    """The service's signing keys."""


@keys.command("stage")
@click.option("--alg", type=click.Choice(keymod.SIGNING_ALGS), default=keymod.DEFAULT_ALG, show_default=True)
@pass_ctx
def keys_stage(ctx, alg):
    """Publish the next key in /jwks without signing with it yet."""
    with ctx.store.session() as s:
        row = _new_key(s, ctx, "staged", alg)
        commit(ctx, s, "keys.stage", row.kid)
    click.echo(f"staged key {row.kid} ({alg}); run `keys rotate` to make it active")


@keys.command("rotate")
@click.option("--alg", type=click.Choice(keymod.SIGNING_ALGS), default=keymod.DEFAULT_ALG, show_default=True)
@pass_ctx
def keys_rotate(ctx, alg):
    """Activate the staged key (or a new one); the active key retires into its grace period."""
    now = utcnow()
    with ctx.store.session() as s:
        staged = s.scalars(select(SigningKey).where(SigningKey.state == "staged").order_by(SigningKey.id)).first()
        new = staged or _new_key(s, ctx, "active", alg)
        for old in s.scalars(select(SigningKey).where(SigningKey.state == "active")):
            if old is not new:
                old.state, old.retired = "retired", now
        new.state, new.activated = "active", now
        s.flush()
        commit(ctx, s, "keys.rotate", new.kid)
    click.echo(f"active key is now {new.kid}")


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def keys_list(ctx, as_json):
    with ctx.store.session() as s:
        rows = [{"kid": k.kid, "alg": k.alg, "state": k.state, "created": _iso(k.created),
                 "activated": _iso(k.activated), "retired": _iso(k.retired)}
                for k in s.scalars(select(SigningKey).order_by(SigningKey.id))]
    emit(rows, as_json, ["kid", "alg", "state", "created", "retired"])


@keys.command("prune")
@pass_ctx
def keys_prune(ctx):
    """Delete retired keys past their grace period (TOKEN_EXCHANGE_KEY_GRACE)."""
    now = utcnow()
    removed = []
    with ctx.store.session() as s:
        for k in s.scalars(select(SigningKey).where(SigningKey.state == "retired")):
            retired = k.retired if k.retired.tzinfo else k.retired.replace(tzinfo=timezone.utc)
            if (now - retired).total_seconds() > ctx.settings.key_grace:
                removed.append(k.kid)
                s.delete(k)
        if removed:
            commit(ctx, s, "keys.prune", ",".join(removed))
    click.echo(f"pruned {len(removed)} key(s)")


def _iso(dt):
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).isoformat()


# -- audit -------------------------------------------------------------------
@cli.group()
def audit():
    """Audit records of exchange decisions and admin changes."""


def _since(value):
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Fail(f"--since must be an ISO 8601 time, e.g. 2026-01-31T12:00:00Z; not {value!r}") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


AUDIT_FIELDS = ["time", "client_id", "issuer", "subject", "target", "source_patient", "target_patient",
                "scope_requested", "scope_granted", "outcome", "error", "jti"]


def audit_dict(e) -> dict:
    d = {f: getattr(e, f) for f in AUDIT_FIELDS}
    d["time"] = _iso(e.time)
    return d


@audit.command("list")
@click.option("--since")
@click.option("--client")
@click.option("--outcome", type=click.Choice(["granted", "refused"]))
@click.option("--admin", is_flag=True, help="show admin changes made with the CLI instead")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def audit_list(ctx, since, client, outcome, admin, as_json):
    since = _since(since)
    if admin:
        rows = [{"time": _iso(e.time), "actor": e.actor, "action": e.action, "detail": e.detail}
                for e in ctx.store.admin_events(since)]
        emit(rows, as_json, ["time", "actor", "action", "detail"])
        return
    rows = [audit_dict(e) for e in ctx.store.audit_events(since, client, outcome)]
    emit(rows, as_json, ["time", "client_id", "target", "outcome", "error", "scope_granted"])


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["fhir"]), required=True)
@click.option("--since")
@pass_ctx
def audit_export(ctx, fmt, since):
    """Write a FHIR R4 Bundle of AuditEvent resources (IHE BALP) to standard output."""
    from .audit import fhir_bundle
    events = [audit_dict(e) for e in ctx.store.audit_events(_since(since))]
    click.echo(json.dumps(fhir_bundle(events, ctx.settings.issuer), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
