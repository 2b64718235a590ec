"""`user-link add|list|remove|import|export|match|block`: users at targets
(source user URL, target) -> the target's own reference for the user (Practitioner/789)."""
from __future__ import annotations

import os

import click

from ..fhir_client import FHIR_ID
from ..mapping.users import SEARCHED_TYPES, USER_TYPES, SourceUser
from ..models import UserLink
from ..store.users import DuplicateUserLink, user_link
from .common import Fail, cli, commit, emit, get_target, json_option, options, pass_ctx, printable, show, url_arg
from .link_files import (asking, at_line, csv_rows, export_file, give_way, given_identifiers, import_file, listed,
                         origin_option, remove_link, row_target, target_id, targets_by_ref)
from .tokens import revoke_on_remove

HEADER = ["user", "target", "target_user"]
LIST_FIELDS = HEADER + ["origin", "system", "matched_at"]


@cli.group("user-link")
def user_link_group():
    """User links: (source user URL, target) -> the user's own resource at the target."""


_which = options([
    click.option("--user", required=True, metavar="URL",
                 help="The user's fhirUser URL at the source: {source}/{Type}/{id}."),
    click.option("--target", "target_ref", required=True, metavar="TARGET", help="The target's base URL or name."),
])


def check_user(value: str, what: str = "--user") -> str:
    """A source user URL: an absolute http(s) {base}/{Type}/{id}, Type a user type."""
    url_arg(value, what)
    base, _, rid = value.rpartition("/")
    rtype = base.rpartition("/")[2]
    if rtype not in USER_TYPES or not FHIR_ID.match(rid):
        raise Fail(f"{what} must be the user's URL at the source, {{source}}/{{Type}}/{{id}} with Type one of "
                   f"{', '.join(USER_TYPES)}: {printable(value)!r}")
    return value


def check_target_user(value: str, what: str = "--target-user") -> str:
    """The target's reference for the user: {Type}/{id}."""
    rtype, sep, rid = (value or "").partition("/")
    if not sep or rtype not in USER_TYPES or not FHIR_ID.match(rid):
        raise Fail(f"{what} must be a reference {{Type}}/{{id}} (e.g. Practitioner/789) with Type one of "
                   f"{', '.join(USER_TYPES)}: {printable(value or '')!r}")
    return value


def _replace_matched(change, old, user, t, new_target_user=None) -> None:
    """A matched link gives way to an admin's; the tokens minted on it are revoked when it changes."""
    give_way(change, old, lambda origin: (
        f"{'a block' if origin == 'blocked' else 'a user link'} for {printable(user)} at {printable(t.base_url)} "
        "already exists; `user-link remove` it first"),
        None if old.target_user == new_target_user else _revoke(change, user, t))


def _revoke(change, user, t):
    """Revoking the tokens minted for ``user`` at target ``t``."""
    return lambda: revoke_on_remove(change, "user", fhir_user=user, target=t.base_url)


@user_link_group.command("add")
@_which
@click.option("--target-user", required=True, metavar="REFERENCE",
              help="The user's own resource at the target, e.g. Practitioner/789.")
@pass_ctx
def user_link_add(ctx, user, target_ref, target_user):
    """Link a source user to the target's own resource for them (replaces a matched link)."""
    check_user(user)
    check_target_user(target_user)
    with ctx.store.admin.change() as change:
        t = get_target(change, target_ref)
        old = user_link(change, user, t.id)
        if old is not None:
            _replace_matched(change, old, user, t, target_user)
        change.add(UserLink(user=user, target_id=t.id, target_user=target_user, origin="table"))
        commit(ctx, change, "user-link.add", f"{user} -> {t.base_url} {target_user}"
               + (" (replaced a matched link)" if old is not None else ""))
    click.echo("user link added" + (" (it replaced a matched link)" if old is not None else ""))


@user_link_group.command("block")
@_which
@pass_ctx
def user_link_block(ctx, user, target_ref):
    """Never map this user at this target (replaces a matched link): an admin's answer to a wrong match."""
    check_user(user)
    with ctx.store.admin.change() as change:
        t = get_target(change, target_ref)
        old = user_link(change, user, t.id)
        if old is not None:
            _replace_matched(change, old, user, t)
        change.add(UserLink(user=user, target_id=t.id, target_user=None, origin="blocked"))
        commit(ctx, change, "user-link.block", f"{user} -> {t.base_url}")
    click.echo("user blocked from mapping at this target")


@user_link_group.command("remove")
@_which
@pass_ctx
def user_link_remove(ctx, user, target_ref):
    """Remove a user link of any origin, or a block; the tokens minted for the user at the target are revoked."""
    with ctx.store.admin.change() as change:
        t = get_target(change, target_ref)
        removed = remove_link(ctx, change, user_link(change, user, t.id), "user link", _revoke(change, user, t),
                              "user-link.remove", f"{user} -> {t.base_url}")
    click.echo(f"{removed} removed")


@user_link_group.command("list")
@click.option("--target", "target_ref", metavar="TARGET", help="Only links to this target (base URL or name).")
@origin_option("map")
@json_option
@pass_ctx
def user_link_list(ctx, target_ref, origin, as_json):
    """List user links (every origin unless --origin)."""
    with ctx.store.user_admin.rows(target_id(ctx, target_ref), [origin] if origin else None) as stored:
        rows = listed(stored, LIST_FIELDS)
    emit(rows, as_json, HEADER + ["origin"])


@user_link_group.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@origin_option("map")
@pass_ctx
def user_link_export(ctx, file, origin):
    """Write user links as CSV (the import format: user,target,target_user) to FILE
    (default: standard output). Table links unless --origin says otherwise."""
    export_file(file, HEADER, lambda: ctx.store.user_admin.rows(origins=[origin or "table"]))


@user_link_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@pass_ctx
def user_link_import(ctx, file):
    """Import user links from a CSV file (or - for standard input) with the header
    user,target,target_user: all or nothing. Matched links are replaced; a link or
    block already stored refuses the file, naming the line."""
    with ctx.store.admin.change() as change:
        targets = targets_by_ref(change)
    with import_file(file) as (name, stream):
        total, replaced = _import(ctx, stream, name, targets)
    click.echo(f"imported {total} user links" + (f" ({replaced} replaced matched links)" if replaced else ""))


def _import(ctx, stream, name, targets):
    rows, seen, replaced = [], set(), 0
    with ctx.store.user_admin.importing() as imp:
        for n, (user, target_ref, target_user) in csv_rows(stream, name, HEADER):
            tid, base_url = row_target(targets, target_ref, name, n)
            with at_line(name, n):
                check_user(user, "user")
                check_target_user(target_user, "target_user")
            if (user, tid) in seen:
                raise Fail(f"{printable(name)}:{n}: duplicate user link for {printable(user)}")
            seen.add((user, tid))
            origin = imp.stored(user, tid)
            if origin in ("table", "blocked"):
                what = "a block" if origin == "blocked" else "a user link"
                raise Fail(f"{printable(name)}:{n}: {what} for {printable(user)} at {printable(base_url)} is "
                           "already stored; nothing was imported")
            if origin == "matched":
                imp.remove_matched(user, tid)
                replaced += 1
            rows.append({"user": user, "target_id": tid, "target_user": target_user})
        if rows:
            try:
                imp.insert(rows)
            except DuplicateUserLink:
                raise Fail(f"{printable(name)}: a user link in the file was stored meanwhile; nothing was "
                           "imported") from None
        imp.finish(ctx.actor, "user-link.import", f"{len(rows)} user links from {os.path.basename(name)}"
                   + (f", {replaced} matched links replaced" if replaced else ""))
    return len(rows), replaced


@user_link_group.command("match")
@_which
@click.option("--identifier", "identifiers", multiple=True, metavar="SYSTEM|VALUE",
              help="An identifier of the user to search the target for (repeatable). Default: the "
                   "identifiers of the user's own resource, read at the EHR (issuer --fhir-client-id).")
@click.option("--dry-run", is_flag=True, help="Search, but store nothing (no link, no remembered outcome).")
@json_option
@pass_ctx
def user_link_match(ctx, user, target_ref, identifiers, dry_run, as_json):
    """Match a source user at a target now, by identifier, as an exchange would (ignoring
    the 10-minute memory), and print the decision and the target's reference. Exits 0
    for any decision, 1 when the target or the EHR cannot be asked. A table link or a
    block is left as it is; a matched link takes the new outcome."""
    from ..mapping.users import make_user_matcher
    from ..upstream import Upstream
    check_user(user)
    cfg = ctx.store.config()
    with ctx.store.admin.change() as change:
        t = get_target(change, target_ref)
        row = user_link(change, user, t.id)
        origin, stored_user = (row.origin, row.target_user) if row is not None else (None, None)
    target = cfg.targets_by_id[t.id]
    issuers = [i for i in cfg.issuers.values() for s in i.sources if user.startswith(s.rstrip("/") + "/")]
    if not issuers:
        raise Fail(f"no issuer vouches for the source of {printable(user)} (issuer add|update --source)")
    source = next(s for s in issuers[0].sources if user.startswith(s.rstrip("/") + "/"))
    rtype, _, rid = user[len(source.rstrip("/")) + 1:].partition("/")
    if rtype not in SEARCHED_TYPES or "/" in rid:
        raise Fail(f"{printable(user)} is not {{source}}/{{Type}}/{{id}} with Type one of "
                   f"{', '.join(SEARCHED_TYPES)} (PractitionerRole and Person users are mapped from the table only)")
    if not target.user_match_identifiers:
        raise Fail(f"target {printable(target.base_url)} is not set up for user matching: "
                   "`target update ... --user-match-identifier SYSTEM`")
    given = given_identifiers(
        identifiers, set(target.user_match_identifiers) & {s for i in issuers for s in i.user_identifier_systems},
        issuers, "is not one the issuer vouches for (--user-identifier-system) and the target lists "
        "(--user-match-identifier)",
        "no issuer of the user's source has --fhir-client-id to read the user's identifiers")
    result = {"user": user, "target": target.base_url}
    if origin in ("table", "blocked"):
        result.update(decision=origin, target_user=stored_user, system=None, searched=[], stored=False,
                      detail="a table link always wins" if origin == "table" else "an admin blocked mapping this "
                             "user at this target (`user-link remove` lifts the block)")
    else:
        matcher = make_user_matcher(ctx.settings, ctx.store, Upstream(ctx.settings))
        u = SourceUser(user, source, rtype, rid, {})
        with asking("user-link match"):
            d = matcher.run(cfg, issuers, target, u, given=given, stale=origin == "matched", store=not dry_run,
                            memory=False, replace_any=True, actor=ctx.actor)
        result.update(decision=d.outcome, target_user=d.target_user, system=d.system, searched=list(d.searched),
                      stored=d.stored, detail=d.explain)
    show(result, as_json)
