"""`config export|apply`: issuers, targets, clients and trusts as one file (JSON or
YAML) under version control, applied in one transaction. Patient links stay in
`link import|export`. The format and the semantics: docs/CONFIG.md."""
from __future__ import annotations

import re

import click

from .common import Fail, cli, pass_ctx
from .config_apply import Plan, fields_of
from .config_file import FIELDS, VERSION, read, write
from ..store.admin import Conflict


@cli.group()
def config():
    """Configuration as code: export and apply issuers, targets, clients and trusts."""


def _variable(used: set, *parts) -> str:
    """A placeholder variable name derived from the object (unique in the file)."""
    slug = re.sub(r"[^A-Z0-9]+", "_", "_".join(parts).upper()).strip("_")[:100] or "X"
    name, n = slug, 2
    while name in used:
        name, n = f"{slug}_{n}", n + 1
    used.add(name)
    return name


def _where(url: str) -> str:
    return re.sub(r"^[a-z]+://", "", url)


def export_doc(change) -> dict:
    """Everything `config apply` takes, as it is stored; each stored secret as the
    variable to read it from at apply time (a placeholder the operator sets)."""
    used: set = set()
    out = {"version": VERSION, "issuers": [], "targets": [], "clients": [], "trusts": []}
    for row in change.issuers():
        d = fields_of("issuers", row)
        d["introspection_secret_env"] = (_variable(used, "ISSUER", _where(row.url), "INTROSPECTION_SECRET")
                                         if row.introspection_secret else None)
        d["login_secret_env"] = (_variable(used, "ISSUER", _where(row.url), "LOGIN_SECRET")
                                 if row.login_secret else None)
        out["issuers"].append({f: d[f] for f, _ in FIELDS["issuers"]})
    for row in change.targets():
        d = fields_of("targets", row)
        d["introspection_secret_env"] = (_variable(used, "TARGET", row.name or _where(row.base_url), "SECRET")
                                         if row.secret_hash else None)
        out["targets"].append({f: d[f] for f, _ in FIELDS["targets"]})
    for row in change.clients():
        d = fields_of("clients", row)
        entry = {f: d[f] for f in ("client_id", "name", "redirect_uris")}
        if row.auth_method != "private_key_jwt":
            entry["secret_env"] = _variable(used, "CLIENT", row.client_id, "SECRET")
        elif row.jwks_uri:
            entry["jwks_uri"] = row.jwks_uri
        else:
            entry["jwks"] = row.jwks
        entry["require_dpop"] = d["require_dpop"]
        entry["disabled"] = d["disabled"]
        out["clients"].append(entry)
    for client_id, issuer_url, base_url, row in change.trusts():
        out["trusts"].append(fields_of("trusts", row, (client_id, issuer_url, base_url)))
    return out


@config.command("export")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml"]), default="json", show_default=True,
              help="The file's format.")
@pass_ctx
def config_export(ctx, fmt):
    """Write every issuer, target, client and trust (never a secret: each `*_env` field
    names a variable to set before `config apply`)."""
    with ctx.store.admin.change() as change:
        doc = export_doc(change)
    click.echo(write(doc, fmt), nl=False)


@config.command("apply")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--dry-run", is_flag=True, help="Print the changes; change nothing.")
@click.option("--prune", is_flag=True, help="Also remove the issuers, targets, clients and trusts the file "
                                            "does not name (with --yes).")
@click.option("--yes", is_flag=True, help="Confirm what --prune removes.")
@pass_ctx
def config_apply(ctx, file, dry_run, prune, yes):
    """Make the database match FILE (JSON or YAML; '-' reads stdin), in one transaction:
    one line per change (+ added, ~ changed, - removed), or `no changes`."""
    doc = read(file)
    with ctx.store.admin.change() as change:
        plan = Plan(ctx, change, doc, prune)
        plan.run()
        if plan.removed and not yes and not dry_run:
            raise Fail(f"--prune would remove {plan.removed} object(s) the file does not name "
                       f"(`--dry-run --prune` lists them); run again with --yes to do it")
        if dry_run or not plan.lines:
            change.rollback()
        else:
            try:
                change.commit_all(ctx.actor, plan.events)
            except Conflict:
                raise Fail("config apply: conflicts with a record made meanwhile; nothing was changed") from None
            ctx.announce()
    for line in plan.lines or ["no changes"]:
        click.echo(line)
