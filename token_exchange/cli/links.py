"""`link add|import|export|list|remove|block|match`: patient links
(source FHIR base, patient) -> (target, target patient)."""
from __future__ import annotations

import csv
import io
import os
import sys

import click

from ..models import PatientLink
from ..store.admin import DuplicateLink
from .tokens import revoke_on_remove
from .common import (Fail, check_id, cli, commit, emit, get_target, iso, json_option, options, pass_ctx,
                     printable, show, url_arg)

ORIGINS = ("table", "matched", "blocked")
LINK_HEADER = ["source", "patient", "target", "target_patient"]
LIST_FIELDS = LINK_HEADER + ["origin", "system", "matched_at"]
# OWASP "CSV Injection": a cell starting with one of these is a formula to a spreadsheet.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


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
        if old is not None and old.origin != "matched":
            what = "a block" if old.origin == "blocked" else "a link"
            raise Fail(f"{what} for patient {printable(patient)} at {printable(source)} to {printable(t.base_url)} "
                       f"already exists; `link remove` it first")
        if old is not None:
            change.remove(old)
            change.flush()
            if old.target_patient != target_patient:  # the tokens minted on the matched link it corrects
                revoke_on_remove(change, "patient", source=source, patient=patient, target=t.base_url)
        change.add(PatientLink(source=source, patient=patient, target_id=t.id, target_patient=target_patient,
                               origin="table"))
        commit(ctx, change, "link.add", f"{source} {patient} -> {t.base_url} {target_patient}"
               + (" (replaced a matched link)" if old is not None else ""))
        warning = _unvouched_warning(_vouched(change), {source: 1})
    click.echo("link added" + (" (it replaced a matched link)" if old is not None else ""))
    if warning:
        click.echo(warning, err=True)


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
        if old is not None and old.origin != "matched":
            raise Fail(f"patient {printable(patient)} at {printable(source)} already has "
                       f"{'a block' if old.origin == 'blocked' else 'a table link'} to {printable(t.base_url)}")
        if old is not None:
            change.remove(old)
            change.flush()
            revoke_on_remove(change, "patient", source=source, patient=patient, target=t.base_url)
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
        old = change.link(source, patient, t.id)
        if old is None:
            raise Fail("no such link")
        change.remove(old)
        if old.origin != "blocked":  # the tokens minted on the link (MATCHING: a wrong link)
            revoke_on_remove(change, "patient", source=source, patient=patient, target=t.base_url)
        commit(ctx, change, "link.remove", f"{source} {patient} -> {t.base_url} ({old.origin})")
    click.echo(f"{'block' if old.origin == 'blocked' else 'link'} removed")


# -- import ----------------------------------------------------------------------
@link.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@pass_ctx
def link_import(ctx, file):
    """Import links from a CSV file (or - for standard input) with the header
    source,patient,target,target_patient: all or nothing. Matched links are replaced;
    a link or block already stored refuses the file, naming the line."""
    with ctx.store.admin.change() as change:
        targets = {}
        for t in change.targets():
            targets[t.base_url] = t.id
            if t.name:
                targets.setdefault(t.name, t.id)
        vouched = _vouched(change)
    name = "<stdin>" if file == "-" else file
    try:
        if file == "-":  # the same bytes as a file would give, not the terminal's decoding
            stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
        else:
            stream = open(file, newline="", encoding="utf-8-sig")  # noqa: SIM115
    except OSError as e:
        raise Fail(f"cannot read {printable(name)}: {e.strerror}") from None
    try:
        with stream if file != "-" else _no_close(stream):
            total, replaced, per_source = _import_links(ctx, stream, name, targets)
    except UnicodeDecodeError:
        raise Fail(f"{printable(name)}: not UTF-8 text") from None
    except csv.Error as e:
        raise Fail(f"{printable(name)}: not a readable CSV ({e})") from None
    click.echo(f"imported {total} links" + (f" ({replaced} replaced matched links)" if replaced else ""))
    warning = _unvouched_warning(vouched, per_source)
    if warning:
        click.echo(warning, err=True)


class _no_close:
    """Use standard input without closing it."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        self.stream.detach()
        return False


def _unneutralise(cell: str) -> str:
    """Undo `link export`'s formula neutralisation (a ' before a formula character)."""
    return cell[1:] if len(cell) > 1 and cell[0] == "'" and cell[1] in FORMULA_START else cell


def _import_links(ctx, stream, name, targets):
    seen = {}  # (source, target id) -> the patients in the file so far: one string per row, not a tuple
    batch, total, replaced = [], 0, 0
    with ctx.store.admin.link_import() as links:
        has_other = links.has_links()
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != LINK_HEADER:
            raise Fail(f"{printable(name)}: the first line must be {','.join(LINK_HEADER)}")
        for n, row in enumerate(reader, start=2):
            if len(row) != 4:
                raise Fail(f"{printable(name)}:{n}: expected 4 fields, found {len(row)}")
            source, patient, target_ref, target_patient = (_unneutralise(c) for c in row)
            tid = targets.get(target_ref)
            if tid is None:
                raise Fail(f"{printable(name)}:{n}: unknown target {printable(target_ref)!r}")
            try:
                url_arg(source, "source")
                check_id(patient, "patient")
                check_id(target_patient, "target_patient")
            except Fail as e:
                raise Fail(f"{printable(name)}:{n}: {e.message}") from None
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
def _neutralise(cell):
    """OWASP CSV injection: a cell that a spreadsheet would run as a formula gets a leading '."""
    return "'" + cell if isinstance(cell, str) and cell.startswith(FORMULA_START) else cell


def _target_id(ctx, target_ref):
    if not target_ref:
        return None
    with ctx.store.admin.change() as change:
        return get_target(change, target_ref).id


origin_option = click.option("--origin", type=click.Choice(ORIGINS), default=None,
                             help="Only links of this origin: table (an admin's), matched (found at the target), "
                                  "blocked (never match).")


@link.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@origin_option
@pass_ctx
def link_export(ctx, file, origin):
    """Write links as CSV (the import format) to FILE (default: standard output).
    Table links unless --origin says otherwise; formula-like cells get a leading '."""
    to_stdout = not file or file == "-"
    try:
        out = sys.stdout if to_stdout else open(file, "w", newline="", encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        raise Fail(f"cannot write {printable(file)}: {e.strerror}") from None
    try:
        w = csv.writer(out)
        w.writerow(LINK_HEADER)
        with ctx.store.admin.links(origins=[origin or "table"], stream=True) as stored:
            for row in stored:
                w.writerow([_neutralise(c) for c in row[:4]])
    finally:
        if not to_stdout:
            out.close()


@link.command("list")
@click.option("--source", metavar="FHIR_BASE", help="Only links from this source.")
@click.option("--target", "target_ref", metavar="TARGET", help="Only links to this target (base URL or name).")
@origin_option
@json_option
@pass_ctx
def link_list(ctx, source, target_ref, origin, as_json):
    """List patient links (every origin unless --origin)."""
    tid = _target_id(ctx, target_ref)
    with ctx.store.admin.links(source, tid, [origin] if origin else None) as stored:
        rows = []
        for r in stored:
            d = dict(zip(LIST_FIELDS, r))
            d["matched_at"] = iso(d["matched_at"])
            rows.append(d)
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
    from ..fhir_client import FHIRUnavailable
    from ..mapping.patients import make_matcher
    from ..mapping.search import usable_identifiers
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
    given = list(identifiers) or None
    if given:
        allowed = set(target.match_identifiers) & {s for i in issuers for s in i.identifier_systems}
        for raw in given:
            system, sep, value = raw.partition("|")
            if not sep or not system or not value:
                raise Fail(f"--identifier must be SYSTEM|VALUE: {printable(raw)!r}")
            if system not in allowed:
                raise Fail(f"--identifier system {printable(system)!r} is not one the issuer of {printable(source)} "
                           f"vouches for (--identifier-system) and the target lists (--match-identifier)")
            if not usable_identifiers([raw], allowed):
                raise Fail(f"--identifier value for {printable(system)} must be 1-128 characters without "
                           "control characters")
    elif not any(i.fhir_client_id for i in issuers):
        raise Fail(f"give --identifier SYSTEM|VALUE: no issuer of {printable(source)} has --fhir-client-id to "
                   "read the source Patient's identifiers")
    result = {"source": source, "patient": patient, "target": target.base_url}
    if origin in ("table", "blocked"):
        result.update(decision=origin, target_patient=stored_patient, system=None, searched=[], stored=False,
                      detail="a table link always wins" if origin == "table" else "an admin blocked matching "
                             "this patient at this target (`link remove` lifts the block)")
    else:
        matcher = make_matcher(ctx.settings, ctx.store, Upstream(ctx.settings))
        try:
            d = matcher.run(cfg, issuers, target, source, patient, given=given, stale=origin == "matched",
                            store=not dry_run, memory=False, replace_any=True, actor=ctx.actor)
        except FHIRUnavailable as e:
            raise Fail(f"could not ask {printable(str(e))}; nothing stored: check that it is up and reachable "
                       "from here, then run `link match` again") from None
        result.update(decision=d.outcome, target_patient=d.target_patient, system=d.system,
                      searched=list(d.searched), stored=d.stored, detail=d.explain)
    show(result, as_json)
