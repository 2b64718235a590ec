"""`target add|update|list|show|remove`: FHIR servers that accept minted tokens."""
from __future__ import annotations

import click

from ..sealing import MIN_SECRET_LENGTH
from ..clock import utcnow
from ..models import Target
from ..sealing import hash_secret
from .common import (Fail, cli, cli_flag, identifier_system, option_values, commit, confirm_cascade, emit, get_target, given_options, json_option,
                     options, pass_ctx, printable, secret_from_env, show, url_arg, yes_option)


@cli.group()
def target():
    """Target FHIR servers that accept minted tokens."""


def _options(update: bool):
    listed = " Given in update, replaces the whole list ('' clears it)." if update else ""
    opts = [
        click.option("--name", help="A short name: usable as `audience` and with --target, and the HTTP Basic "
                                    "user name for /introspect."),
        click.option("--max-ttl", type=click.IntRange(1, None), metavar="SECONDS",
                     help="Longest lifetime of tokens minted for it."),
        click.option("--introspection-secret-env", metavar="VAR",
                     help="Environment variable holding its secret for /introspect (needs --name)."),
        click.option("--match-identifier", "match_identifiers", multiple=True, metavar="SYSTEM",
                     help="An identifier system that names exactly one patient here; enables patient "
                          "matching (repeatable)." + listed),
        click.option("--match-ttl", type=click.IntRange(1, 3650), metavar="DAYS",
                     default=None if update else 30, show_default=not update,
                     help="How long a matched link (patient or user) serves before it is matched again."),
        click.option("--users", type=click.Choice(["as-is", "mapped"]), default=None if update else "as-is",
                     show_default=not update,
                     help="as-is: fhirUser passed on as the source names the user; mapped: user/ scopes only "
                          "for a user mapped onto this target, whose own URL the token's fhirUser is."),
        click.option("--user-match-identifier", "user_match_identifiers", multiple=True, metavar="SYSTEM",
                     help="An identifier system that names exactly one user here (e.g. "
                          "http://hl7.org/fhir/sid/us-npi); enables user matching (repeatable)." + listed),
    ]
    if update:
        opts += [click.option("--no-max-ttl", is_flag=True, help="Remove the lifetime cap."),
                 click.option("--no-introspection-secret", is_flag=True, help="Remove its /introspect secret.")]
    return options(opts)


FLAG = cli_flag({"match_identifiers": "--match-identifier", "user_match_identifiers": "--user-match-identifier"})


def new_target(ctx, change, base_url: str, o: dict, name=FLAG, url_name: str = "BASE_URL") -> Target:
    """`target add` and `config apply`: check BASE_URL and the options, and add the target
    to the change (not committed)."""
    url_arg(base_url, url_name)
    if change.has_target(base_url):
        raise Fail(f"target {printable(base_url)} already exists; change it with `target update`")
    row = Target(base_url=base_url, match_identifiers=[], user_match_identifiers=[], created=utcnow())
    apply_options(ctx, change, row, o, name)
    change.add(row)
    return row


def apply_options(ctx, change, row: Target, o: dict, name=FLAG):
    """Validate the given options and set them on row: the one home of each target
    option's rule (`target add|update` and `config apply`)."""
    if o.get("no_name"):  # config apply: the file gives the target no name
        row.name = None
    if o.get("name") is not None:
        value = o["name"]
        if not value or len(value) > 255 or not value.isprintable() or " " in value or ":" in value \
                or "/" in value:
            raise Fail(f"{name('name')} must be 1-255 printable characters without spaces, ':' or '/'")
        if change.target_name_taken(value, other_than=row.id):
            raise Fail(f"a target named {printable(value)!r} already exists")
        row.name = value
    if o.get("max_ttl") is not None:
        row.max_ttl = o["max_ttl"]
    if o.get("no_max_ttl"):
        row.max_ttl = None
    if o.get("no_introspection_secret"):
        row.secret_salt = row.secret_hash = None
    if o.get("introspection_secret_env"):
        row.secret_salt, row.secret_hash = hash_secret(
            secret_from_env(o["introspection_secret_env"], "target secret", name("introspection_secret_env"),
                            MIN_SECRET_LENGTH), ctx.sealing_secret())
    if o.get("match_identifiers"):
        row.match_identifiers = [identifier_system(v, name("match_identifiers"))
                                 for v in option_values(o["match_identifiers"])]
    if o.get("users") is not None:
        row.users = o["users"]
    if o.get("user_match_identifiers"):
        row.user_match_identifiers = [identifier_system(v, name("user_match_identifiers"))
                                      for v in option_values(o["user_match_identifiers"])]
    if o.get("match_ttl") is not None:
        row.match_ttl_days = o["match_ttl"]
    if row.secret_hash and not row.name:
        raise Fail("a target that introspects needs --name (its HTTP Basic user name)")


@target.command("add")
@click.argument("base_url")
@_options(update=False)
@pass_ctx
def target_add(ctx, base_url, **o):
    """Register BASE_URL (the aud of tokens minted for it)."""
    with ctx.store.admin.change() as change:
        new_target(ctx, change, base_url, o)
        commit(ctx, change, "target.add", base_url)
    click.echo(f"target {printable(base_url)} added")


@target.command("update")
@click.argument("target")
@_options(update=True)
@pass_ctx
def target_update(ctx, target, **o):
    """Change TARGET's settings (its base URL or name): only the options given change."""
    given = given_options(o)
    if not given:
        raise Fail("nothing to change: give at least one option (see `target update --help`)")
    with ctx.store.admin.change() as change:
        row = get_target(change, target)
        apply_options(ctx, change, row, given)
        commit(ctx, change, "target.update", f"{row.base_url}: {', '.join(sorted(given))}")
    click.echo(f"target {printable(row.base_url)} updated")


def target_row(t: Target) -> dict:
    return {"base_url": t.base_url, "name": t.name, "max_ttl": t.max_ttl,
            "introspection_secret": "set" if t.secret_hash else None,
            "match_identifiers": t.match_identifiers or [], "match_ttl_days": t.match_ttl_days,
            "users": t.users, "user_match_identifiers": t.user_match_identifiers or []}


@target.command("list")
@json_option
@pass_ctx
def target_list(ctx, as_json):
    """List the targets."""
    with ctx.store.admin.change() as change:
        rows = [target_row(t) for t in change.targets()]
    emit(rows, as_json, ["base_url", "name", "max_ttl"])


@target.command("show")
@click.argument("target")
@json_option
@pass_ctx
def target_show(ctx, target, as_json):
    """Show one target (by base URL or name)."""
    with ctx.store.admin.change() as change:
        show(target_row(get_target(change, target)), as_json)


@target.command("remove")
@click.argument("target")
@yes_option
@pass_ctx
def target_remove(ctx, target, yes):
    """Remove a target (with --yes, also its trusts, patient links and consents)."""
    with ctx.store.admin.change() as change:
        t = get_target(change, target)
        deps = change.target_dependents(t)
        counts = {"trust(s)": deps["trusts"], "patient link(s)": deps["links"], "consent(s)": deps["consents"],
                  "user link(s)": deps["user_links"]}
        confirm_cascade(f"target {printable(t.base_url)}", counts, yes)
        change.remove_target(t)
        detail = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        commit(ctx, change, "target.remove", t.base_url + (f" (and {detail})" if detail else ""))
    click.echo(f"target {printable(t.base_url)} removed" + (f" with {detail}" if detail else ""))
