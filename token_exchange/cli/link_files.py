"""What the `link` and `user-link` groups share: their CSV files (import and export,
formula cells neutralised), the filters of `list` and `export`, an admin's link or
block replacing a matched one, `remove`, and `match`'s --identifier checks and
failures. Each group passes in its own wording."""
from __future__ import annotations

import csv
import io
import sys
from contextlib import contextmanager

import click

from .common import Fail, commit, get_target, iso, printable

ORIGINS = ("table", "matched", "blocked")
# OWASP "CSV Injection": a cell starting with one of these is a formula to a spreadsheet.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def origin_option(never: str):
    """`list` and `export`'s --origin; ``never``: what a block stops (match, map)."""
    return click.option("--origin", type=click.Choice(ORIGINS), default=None,
                        help="Only links of this origin: table (an admin's), matched (found at the target), "
                             f"blocked (never {never}).")


def target_id(ctx, target_ref):
    """The id of the target named by --target (base URL or name), None when not given."""
    if not target_ref:
        return None
    with ctx.store.admin.change() as change:
        return get_target(change, target_ref).id


def targets_by_ref(change) -> dict:
    """Every target by its base URL and by its name: (id, base URL)."""
    targets = {}
    for t in change.targets():
        targets[t.base_url] = (t.id, t.base_url)
        if t.name:
            targets.setdefault(t.name, (t.id, t.base_url))
    return targets


# -- an admin's link or block, remove ----------------------------------------------------
def give_way(change, old, refusal, revoke) -> None:
    """A matched link gives way to an admin's link or block (``revoke()``, when given,
    revokes the tokens minted on it); a table link or a block refuses with
    ``refusal(origin)``."""
    if old.origin != "matched":
        raise Fail(refusal(old.origin))
    change.remove(old)
    change.flush()
    if revoke is not None:
        revoke()


def remove_link(ctx, change, old, noun: str, revoke, action: str, detail: str) -> str:
    """`remove`: a link of any origin (``revoke()`` revokes the tokens minted on it), or a
    block; -> what was removed: block or ``noun``."""
    if old is None:
        raise Fail(f"no such {noun}")
    change.remove(old)
    if old.origin != "blocked":  # the tokens minted on the link (MATCHING: a wrong link)
        revoke()
    commit(ctx, change, action, f"{detail} ({old.origin})")
    return "block" if old.origin == "blocked" else noun


# -- import ------------------------------------------------------------------------------
@contextmanager
def import_file(file):
    """(name, text stream) of the CSV file to import, or - for standard input (the same
    bytes as a file would give, not the terminal's decoding); unreadable, not UTF-8 or
    not CSV: one line naming it. Standard input is left open."""
    name = "<stdin>" if file == "-" else file
    try:
        stream = (io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="") if file == "-"
                  else open(file, newline="", encoding="utf-8-sig"))  # noqa: SIM115
    except OSError as e:
        raise Fail(f"cannot read {printable(name)}: {e.strerror}") from None
    try:
        yield name, stream
    except UnicodeDecodeError:
        raise Fail(f"{printable(name)}: not UTF-8 text") from None
    except csv.Error as e:
        raise Fail(f"{printable(name)}: not a readable CSV ({e})") from None
    finally:
        if file == "-":
            stream.detach()
        else:
            stream.close()


def unneutralise(cell: str) -> str:
    """Undo `export`'s formula neutralisation (a ' before a formula character)."""
    return cell[1:] if len(cell) > 1 and cell[0] == "'" and cell[1] in FORMULA_START else cell


def csv_rows(stream, name, header):
    """(line number, cells) of each row after the first line, which must be ``header``;
    every row has one cell per column, neutralised cells restored."""
    reader = csv.reader(stream)
    first = next(reader, None)
    if first is None or [h.strip() for h in first] != header:
        raise Fail(f"{printable(name)}: the first line must be {','.join(header)}")
    for n, row in enumerate(reader, start=2):
        if len(row) != len(header):
            raise Fail(f"{printable(name)}:{n}: expected {len(header)} fields, found {len(row)}")
        yield n, [unneutralise(c) for c in row]


def row_target(targets: dict, target_ref, name, n):
    """(id, base URL) of a row's target, or a failure naming the line."""
    found = targets.get(target_ref)
    if found is None:
        raise Fail(f"{printable(name)}:{n}: unknown target {printable(target_ref)!r}")
    return found


@contextmanager
def at_line(name, n):
    """A row's argument check failing names the file and the line."""
    try:
        yield
    except Fail as e:
        raise Fail(f"{printable(name)}:{n}: {e.message}") from None


# -- export and list ---------------------------------------------------------------------
def neutralise(cell):
    """OWASP CSV injection: a cell that a spreadsheet would run as a formula gets a leading '."""
    return "'" + cell if isinstance(cell, str) and cell.startswith(FORMULA_START) else cell


def export_file(file, header, stored_rows) -> None:
    """Write ``header`` and the first cells of each row ``stored_rows()`` (a context)
    yields, formula-like cells neutralised, as CSV to FILE (default: standard output)."""
    to_stdout = not file or file == "-"
    try:
        out = sys.stdout if to_stdout else open(file, "w", newline="", encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        raise Fail(f"cannot write {printable(file)}: {e.strerror}") from None
    try:
        w = csv.writer(out)
        w.writerow(header)
        with stored_rows() as stored:
            for row in stored:
                w.writerow([neutralise(c) for c in row[:len(header)]])
    finally:
        if not to_stdout:
            out.close()


def listed(stored, fields) -> list[dict]:
    """`list`'s rows: each stored row by ``fields``, its matched_at in ISO 8601."""
    rows = []
    for r in stored:
        d = dict(zip(fields, r))
        d["matched_at"] = iso(d["matched_at"])
        rows.append(d)
    return rows


# -- match -------------------------------------------------------------------------------
def given_identifiers(identifiers, allowed, issuers, not_allowed: str, unread: str) -> list | None:
    """`match`'s --identifier values (checked: ``check_identifiers``), or None when none is
    given and an issuer can read them at the EHR (else the failure says ``unread``)."""
    given = list(identifiers) or None
    if given:
        check_identifiers(given, allowed, not_allowed)
    elif not any(i.fhir_client_id for i in issuers):
        raise Fail(f"give --identifier SYSTEM|VALUE: {unread}")
    return given


def check_identifiers(given, allowed, not_allowed: str) -> None:
    """`match`'s --identifier values: SYSTEM|VALUE, of a system in ``allowed`` (else the
    failure says it ``not_allowed``), with a usable value."""
    from ..mapping.search import usable_identifiers
    for raw in given:
        system, sep, value = raw.partition("|")
        if not sep or not system or not value:
            raise Fail(f"--identifier must be SYSTEM|VALUE: {printable(raw)!r}")
        if system not in allowed:
            raise Fail(f"--identifier system {printable(system)!r} {not_allowed}")
        if not usable_identifiers([raw], allowed):
            raise Fail(f"--identifier value for {printable(system)} must be 1-128 characters without "
                       "control characters")


@contextmanager
def asking(command: str):
    """`match` when the target or the EHR cannot be asked: one line, nothing stored."""
    from ..fhir_client import FHIRUnavailable
    try:
        yield
    except FHIRUnavailable as e:
        raise Fail(f"could not ask {printable(str(e))}; nothing stored: check that it is up and reachable "
                   f"from here, then run `{command}` again") from None
