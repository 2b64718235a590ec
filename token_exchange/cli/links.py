"""`link add|import|export|list|remove|block|match`: patient links
(source FHIR base, patient) -> (target, target patient)."""
from __future__ import annotations

import os

import click

from ..models import PatientLink
from ..store.admin import DuplicateLink
from .common import (Fail, check_id, cli, commit, emit, get_target, json_option, options, pass_ctx, printable,
                     show, url_arg)
from .link_files import (asking, at_line, csv_rows, export_file, give_way, given_identifiers, import_file, listed,
                         origin_option, remove_link, row_target, target_id, targets_by_ref)
from .tokens import revoke_on_remove

LINK_HEADER = ["source", "patient", "target", "target_patient"]
LIST_FIELDS = LINK_HEADER + ["origin", "system", "matched_at"]


@cli.group()
def link():
    """Patient links: (source FHIR base, patient) -> (target, target patient)."""


_WHICH = [
    click.option("--source", required=True, metavar="FHIR_BASE", help="The source FHIR base URL."),
    click.option("--patient", required=True, metavar="ID", help="The patient id at the source."),
    click.option("--target", "target_ref", required=True, metavar="TARGET", help="The target's base URL or name."),
]


_which = options(_WHICH)


@link.command("add")
@_which
@click.option("--target-patient", required=True, metavar="ID", help="The patient id at the target.")
@pass_ctx
def link_add(ctx, source, patient, target_ref, target_patient):
    """Link a source patient to a target patient (replaces a matched link, never a table link)."""
    url_arg(source, "--source")
    check_id(patient, "--patient")
    check_id(target_patient, "--target-patient")
    with ctx.store.admin.change() as change:
        t = get_target(change, target_ref)
        old = change.link(source, patient, t.id)
        if old is not None:
            give_way(change, old, lambda origin: (
                f"{'a block' if origin == 'blocked' else 'a link'} for patient {printable(patient)} at "
                f"{printable(source)} to {printable(t.base_url)} already exists; `link remove` it first"),
                # the tokens minted on the matched link it corrects
                None if old.target_patient == target_patient else _revoke(change, source, patient, t))
        change.add(PatientLink(source=source, patient=patient, target_id=t.id, target_patient=target_patient,
                               origin="table"))
        commit(ctx, change, "link.add", f"{source} {patient} -> {t.base_url} {target_patient}"
               + (" (replaced a matched link)" if old is not None else ""))
        warning = _unvouched_warning(_vouched(change), {source: 1})
    click.echo("link added" + (" (it replaced a matched link)" if old is not None else ""))
    if warning:
        click.echo(warning, err=True)


def _revoke(change, source, patient, t):
    """Revoking the tokens minted on the link of (source, patient) at target ``t``."""
    return lambda: revoke_on_remove(change, "patient", source=source, patient=patient, target=t.base_url)


def _vouched(change) -> set:
    """The sources some issuer vouches for (its --source list)."""
    return {s for i in change.issuers() for s in (i.sources or ())}


def _unvouched_warning(vouched: set, counts: dict) -> str | None:
    """A link is used only when a token places its patient at its source, which only an
    issuer vouching for that source can do: links for other sources are never used."""
    unvouched = {s: n for s, n in counts.items() if s not in vouched}
    if not unvouched:
        return None
    n = sum(unvouched.values())
    names = ", ".join(printable(s) for s in sorted(unvouched)[:5]) + (" ..." if len(unvouched) > 5 else "")
    return (f"warning: no issuer vouches for {names} ({n} link{'s' if n != 1 else ''}): no exchange will use "
            f"{'these links' if n != 1 else 'this link'} until an issuer lists the source with `issuer update "
            "ISSUER --source ...`")


@link.command("block")
@_which
@pass_ctx
def link_block(ctx, source, patient, target_ref):
    """Never match this patient at this target (replaces a matched link)."""
    url_arg(source, "--source")
    check_id(patient, "--patient")
    with ctx.store.admin.change() as change:
        t = get_target(change, target_ref)
        old = change.link(source, patient, t.id)
        if old is not None:
            give_way(change, old, lambda origin: (
                f"patient {printable(patient)} at {printable(source)} already has "
                f"{'a block' if origin == 'blocked' else 'a table link'} to {printable(t.base_url)}"),
                _revoke(change, source, patient, t))
        change.add(PatientLink(source=source, patient=patient, target_id=t.id, target_patient=None,
                               origin="blocked"))
        commit(ctx, change, "link.block", f"{source} {patient} -> {t.base_url}")
    click.echo("patient blocked from matching at this target")


@link.command("remove")
@_which
@pass_ctx
def link_remove(ctx, source, patient, target_ref):
    """Remove a link of any origin, or a block."""
    with ctx.store.admin.change() as change:
        t = get_target(change, target_ref)
        removed = remove_link(ctx, change, change.link(source, patient, t.id), "link",
                              _revoke(change, source, patient, t), "link.remove", f"{source} {patient} -> {t.base_url}")
    click.echo(f"{removed} removed")


# -- import ----------------------------------------------------------------------
@link.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@pass_ctx
def link_import(ctx, file):
    """Import links from a CSV file (or - for standard input) with the header
    source,patient,target,target_patient: all or nothing. Matched links are replaced;
    a link or block already stored refuses the file, naming the line."""
    with ctx.store.admin.change() as change:
        targets = targets_by_ref(change)
        vouched = _vouched(change)
    with import_file(file) as (name, stream):
        total, replaced, per_source = _import_links(ctx, stream, name, targets)
    click.echo(f"imported {total} links" + (f" ({replaced} replaced matched links)" if replaced else ""))
    warning = _unvouched_warning(vouched, per_source)
    if warning:
        click.echo(warning, err=True)


def _import_links(ctx, stream, name, targets):
    seen = {}  # (source, target id) -> the patients in the file so far: one string per row, not a tuple
    batch, total, replaced = [], 0, 0
    with ctx.store.admin.link_import() as links:
        has_other = links.has_links()
        for n, (source, patient, target_ref, target_patient) in csv_rows(stream, name, LINK_HEADER):
            tid, _ = row_target(targets, target_ref, name, n)
            with at_line(name, n):
                url_arg(source, "source")
                check_id(patient, "patient")
                check_id(target_patient, "target_patient")
            patients = seen.get((source, tid))
            if patients is None:
                patients = seen[(source, tid)] = set()
            elif patient in patients:
                raise Fail(f"{printable(name)}:{n}: duplicate link for patient {printable(patient)!r} at "
                           f"{printable(source)}")
            patients.add(patient)
            batch.append((n, {"source": source, "patient": patient, "target_id": tid,
                              "target_patient": target_patient}))
            if len(batch) >= 20000:
                total, replaced = _flush(links, batch, name, has_other, total, replaced)
                batch = []
        total, replaced = _flush(links, batch, name, has_other, total, replaced)
        links.finish(ctx.actor, "link.import", f"{total} links from {os.path.basename(name)}"
                     + (f", {replaced} matched links replaced" if replaced else ""))
    per_source = {}  # source -> how many links of the file
    for (source, _tid), patients in seen.items():
        per_source[source] = per_source.get(source, 0) + len(patients)
    return total, replaced, per_source


def _flush(links, batch, name, has_other, total, replaced):
    if not batch:
        return total, replaced
    if has_other:  # links already stored: matched ones give way; any other refuses the file
        replaced += _clear_matched(links, batch, name)
    _insert_links(links, batch, name)
    return total + len(batch), replaced


def _clear_matched(links, batch, name):
    stored = links.stored(batch)
    matched = []
    for n, r in batch:
        origin = stored.get((r["source"], r["patient"], r["target_id"]))
        if origin in ("table", "blocked"):
            what = "a block" if origin == "blocked" else "a link"
            raise Fail(f"{printable(name)}:{n}: {what} for patient {printable(r['patient'])!r} at "
                       f"{printable(r['source'])} is already stored; nothing was imported")
        if origin == "matched":
            matched.append((r["source"], r["patient"], r["target_id"]))
    links.remove(matched)
    return len(matched)


def _insert_links(links, batch, name):
    """One batch inside the import's transaction. A link stored meanwhile refuses the
    file, naming its line."""
    try:
        links.insert(batch)
    except DuplicateLink:
        stored = links.stored(batch)
        line = next((n for n, r in batch if (r["source"], r["patient"], r["target_id"]) in stored), None)
        where = f"{printable(name)}:{line}" if line else printable(name)
        raise Fail(f"{where}: a link in the file is already stored; nothing was imported") from None


# -- export and list --------------------------------------------------------------
@link.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@origin_option("match")
@pass_ctx
def link_export(ctx, file, origin):
    """Write links as CSV (the import format) to FILE (default: standard output).
    Table links unless --origin says otherwise; formula-like cells get a leading '."""
    export_file(file, LINK_HEADER, lambda: ctx.store.admin.links(origins=[origin or "table"], stream=True))


@link.command("list")
@click.option("--source", metavar="FHIR_BASE", help="Only links from this source.")
@click.option("--target", "target_ref", metavar="TARGET", help="Only links to this target (base URL or name).")
@origin_option("match")
@json_option
@pass_ctx
def link_list(ctx, source, target_ref, origin, as_json):
    """List patient links (every origin unless --origin)."""
    with ctx.store.admin.links(source, target_id(ctx, target_ref), [origin] if origin else None) as stored:
        rows = listed(stored, LIST_FIELDS)
    emit(rows, as_json, LINK_HEADER + ["origin"])


# -- match --------------------------------------------------------------------------
@link.command("match")
@_which
@click.option("--identifier", "identifiers", multiple=True, metavar="SYSTEM|VALUE",
              help="An identifier of the patient to search the target for (repeatable). Default: the "
                   "identifiers of the source Patient, read at the EHR (issuer --fhir-client-id).")
@click.option("--dry-run", is_flag=True, help="Search, but store nothing (no link, no remembered outcome).")
@json_option
@pass_ctx
def link_match(ctx, source, patient, target_ref, identifiers, dry_run, as_json):
    """Match a source patient at a target now, by identifier, as an exchange would
    (ignoring the 10-minute memory of no or several matches), and print the decision
    and the target patient id. Exits 0 for any decision, 1 when the target or the
    EHR cannot be asked. A table link or a block is left as it is; a matched link
    takes the new outcome."""
    from ..mapping.patients import make_matcher
    from ..upstream import Upstream
    url_arg(source, "--source")
    check_id(patient, "--patient")
    cfg = ctx.store.config()
    with ctx.store.admin.change() as change:
        t = get_target(change, target_ref)
        row = change.link(source, patient, t.id)
        origin, stored_patient = (row.origin, row.target_patient) if row is not None else (None, None)
    target = cfg.targets_by_id[t.id]
    issuers = [i for i in cfg.issuers.values() if source in i.sources]
    if not issuers:
        raise Fail(f"no issuer may vouch for source {printable(source)} (issuer add|update --source)")
    if not target.match_identifiers:
        raise Fail(f"target {printable(target.base_url)} is not set up for matching: "
                   "`target update ... --match-identifier SYSTEM`")
    given = given_identifiers(
        identifiers, set(target.match_identifiers) & {s for i in issuers for s in i.identifier_systems}, issuers,
        f"is not one the issuer of {printable(source)} vouches for (--identifier-system) and the target lists "
        "(--match-identifier)",
        f"no issuer of {printable(source)} has --fhir-client-id to read the source Patient's identifiers")
    result = {"source": source, "patient": patient, "target": target.base_url}
    if origin in ("table", "blocked"):
        result.update(decision=origin, target_patient=stored_patient, system=None, searched=[], stored=False,
                      detail="a table link always wins" if origin == "table" else "an admin blocked matching "
                             "this patient at this target (`link remove` lifts the block)")
    else:
        matcher = make_matcher(ctx.settings, ctx.store, Upstream(ctx.settings))
        with asking("link match"):
            d = matcher.run(cfg, issuers, target, source, patient, given=given, stale=origin == "matched",
                            store=not dry_run, memory=False, replace_any=True, actor=ctx.actor)
        result.update(decision=d.outcome, target_patient=d.target_patient, system=d.system,
                      searched=list(d.searched), stored=d.stored, detail=d.explain)
    show(result, as_json)
