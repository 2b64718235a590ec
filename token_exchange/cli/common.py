"""What every `token-exchange` command shares: the root group, the context (settings,
database, who is acting), one-line failures, output, and argument checks.

Every failure exits non-zero with one `error:` line on stderr and changes nothing.
Secrets come from environment variables (never the command line) and are never
printed, except a generated client secret, once.
"""
from __future__ import annotations

import getpass
import ipaddress
import json
import os
import re
import sys
from datetime import datetime, timezone
from urllib.parse import urlsplit

import click
from sqlalchemy.exc import OperationalError, ProgrammingError

from ..clock import aware
from ..store.admin import Conflict


class Fail(click.ClickException):
    """A failure the user can act on: one line, exit 1."""

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


class Ctx:
    """Settings, store and actor of one command (made on first use, so --help needs none).
    The store, its engine and Redis come from ``Store.open``, the wiring ``create_app`` uses."""

    def __init__(self):
        from ..settings import Settings, SettingsError
        from ..store import Store
        try:
            self.settings = Settings.from_env()
            self.store = Store.open(self.settings)
        except SettingsError as e:
            raise Fail(str(e)) from None
        self.engine, self.accel = self.store.engine, self.store.accel
        self.actor = os.environ.get("TOKEN_EXCHANGE_ADMIN") or _whoami()
        click_ctx = click.get_current_context(silent=True)
        if click_ctx is not None:
            click_ctx.call_on_close(self.engine.dispose)  # no connection outlives the command

    def sealing_secret(self) -> str | None:
        """The key secret a command seals keys and outbound secrets (and peppers inbound
        secret hashes) under: refused, in one line, when it cannot unseal what is
        already stored, so one database never holds values under two key secrets
        (whichever the service started with, the others would lock it out)."""
        from ..sealing import opens
        key = self.settings.key_secret
        if not getattr(self, "_sealing_checked", False):
            with self.store.admin.change() as change:
                foreign = [what for what, row, attr in change.sealed() if not opens(getattr(row, attr), key)]
            if foreign:
                raise Fail(f"TOKEN_EXCHANGE_KEY_SECRET cannot unseal {len(foreign)} stored key(s) or secret(s) "
                           f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), so nothing new is "
                           "stored under it: run with the key secret they were sealed under, or re-seal them "
                           "with `token-exchange keys reseal --old-secret-env VAR`")
            self._sealing_checked = True
        return key

    def announce(self):
        """Tell running workers (through Redis, when configured) to reload now."""
        self.accel.publish_change()


def _whoami():
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return f"uid:{os.getuid()}"


pass_ctx = click.make_pass_decorator(Ctx, ensure=True)


# -- the root group ------------------------------------------------------------
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class OneLineErrors(click.Group):
    """Click's usage errors (missing option, bad choice, unknown command) print the
    usage and a hint too; here they are one `error:` line like every other failure
    (exit 2 for usage errors, as click has it)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from .. import logs
        undo = logs.quiet()  # the library's log lines stay off the terminal (`serve` logs JSON itself)
        try:
            return self._main(args, prog_name, complete_var, standalone_mode, **extra)
        finally:
            undo()

    def _main(self, args, prog_name, complete_var, standalone_mode, **extra):
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
        except (OperationalError, ProgrammingError) as e:
            click.echo(f"error: {database_problem(e)}", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="token-exchange", prog_name="token-exchange", message="%(prog)s %(version)s")
def cli():
    """Administer the token-exchange service (RFC 8693 for SMART on FHIR).

    Configuration comes from the environment: TOKEN_EXCHANGE_DATABASE_URL,
    TOKEN_EXCHANGE_ISSUER, TOKEN_EXCHANGE_KEY_SECRET and the others in
    docs/REFERENCE.md. Every change is recorded (`audit list --admin`).
    """


def main():
    cli(standalone_mode=True)


_MISSING_TABLE = re.compile(r"no such table|relation \"?[\w.]+\"? does not exist|UndefinedTable", re.I)


def database_problem(exc) -> str:
    """One line for a database error: no schema -> run db upgrade; else where it failed
    to connect (host and database, never the password)."""
    text = str(getattr(exc, "orig", None) or exc)
    if _MISSING_TABLE.search(text) or type(getattr(exc, "orig", None)).__name__ == "UndefinedTable":
        return "the database has no schema (or an older one): run `token-exchange db upgrade`"
    from sqlalchemy.engine import make_url

    from ..settings import Settings
    try:
        url = make_url(Settings.from_env().database_url)
        where = (f"{url.host or 'localhost'}:{url.port or 5432}, database {url.database}"
                 if url.get_backend_name() != "sqlite" else url.database)
    except Exception:  # noqa: BLE001 - the URL itself was the problem; named elsewhere
        where = "the configured address"
    orig = getattr(exc, "orig", None) or exc
    lines = [ln for ln in str(orig).strip().splitlines() if ln.strip()]
    reason = printable(lines[-1].strip() if lines else type(orig).__name__)
    if "password" in reason.lower():  # never echo anything near a password
        reason = type(orig).__name__
    return f"the database is unreachable at {where} ({reason[:200]})"


# -- arguments ------------------------------------------------------------------
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")


def url_arg(value: str, what: str, https_only_beyond_loopback: bool = False) -> str:
    """An absolute http(s) URL without a fragment (and, where asked, https unless loopback)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment \
            or "#" in value or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise Fail(f"{what} must be an absolute http(s) URL without a fragment: {printable(value)!r}")
    if https_only_beyond_loopback and parts.scheme == "http" and not is_loopback(parts.hostname):
        raise Fail(f"{what} must use https (http only for loopback addresses): {printable(value)!r}")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def secret_from_env(var: str, what: str, option: str, min_len: int = 0) -> str:
    """The secret in environment variable VAR. VAR must be a variable's name: a value
    given by mistake is refused without being repeated, and no failure repeats VAR
    (a secret given by mistake can look like a name): it names the option."""
    opt = option
    if not _ENV_NAME.match(var or ""):
        raise Fail(f"{opt} takes the NAME of an environment variable (letters, digits and _), "
                   f"not the secret itself; put the {what} in a variable and name it")
    value = os.environ.get(var)
    if not value:
        raise Fail(f"{opt}: the environment variable it names is not set or empty; set it to the {what} "
                   f"(and give {opt} the variable's NAME, not the secret)")
    if len(value) < min_len:
        raise Fail(f"{opt}: the {what} in the variable it names is shorter than {min_len} characters; "
                   "use a high-entropy secret")
    return value


def check_id(value, what):
    """An identifier: 1-255 printable characters, no spaces or control characters."""
    if not value or len(value) > 255 or any(c.isspace() or not c.isprintable() for c in value):
        raise Fail(f"{what} must be 1-255 printable characters without spaces: {printable(value)!r}")
    return value


# -- output -----------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(value) -> str:
    """Text safe for a terminal: control characters (escape sequences, NUL, bidi
    overrides) shown as \\xNN / \\uNNNN, never written raw."""
    text = str(value)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)


def cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ",".join(printable(x) for x in v) or "-"
    return printable(v)


def emit(rows, as_json, columns):
    """A table (control characters escaped), or JSON (json escapes them itself)."""
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("(none)")
        return
    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        click.echo("  ".join(cell(r.get(c)).ljust(widths[c]) for c in columns).rstrip())


def show(row, as_json):
    if as_json:
        click.echo(json.dumps(row, indent=2, default=str))
    else:
        for k, v in row.items():
            click.echo(f"{k}: {cell(v)}")


def iso(dt):
    if dt is None:
        return None
    return aware(dt).isoformat()


def since_arg(value):
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Fail(f"--since must be an ISO 8601 time, e.g. 2026-01-31T12:00:00Z; not {printable(value)!r}") from None
    return aware(dt).astimezone(timezone.utc)


# -- database -------------------------------------------------------------------------
def commit(ctx: Ctx, change, action: str, detail: str):
    """Record the change (who, what, when), commit, and tell running workers."""
    try:
        change.commit(ctx.actor, action, detail)
    except Conflict:
        raise Fail(f"{action}: conflicts with an existing record ({printable(detail)})") from None
    ctx.announce()


def found(row, what, value):
    """The row looked up, or a failure naming what was not found."""
    if row is None:
        raise Fail(f"no {what} {printable(value)!r}")
    return row


def get_target(change, value):
    """A target by its base URL or its registered name."""
    row = change.target(value)
    if row is None:
        raise Fail(f"no target {printable(value)!r} (give its base URL or its name; `target list` shows them)")
    return row


def given_options(options: dict) -> dict:
    """The options an `update` was given: not None, not an empty repeatable option,
    and no --no-X flag left off."""
    return {k: v for k, v in options.items()
            if v is not None and v != () and not (k.startswith("no_") and v is False)}


def confirm_cascade(what: str, counts: dict, yes: bool):
    """A removal that would delete other records says what and how many, and acts only with --yes."""
    pending = {k: n for k, n in counts.items() if n}
    if pending and not yes:
        listed = ", ".join(f"{n} {k}" for k, n in pending.items())
        raise Fail(f"removing {what} would also delete {listed}; run again with --yes to do it")


def remove_with_trusts(ctx, key: str, noun: str, yes: bool, also=None) -> None:
    """`issuer remove` and `client remove`: the issuer or client named ``key`` and (with
    --yes) every trust that names it, in one audited transaction (with ``also(change)``)."""
    with ctx.store.admin.change() as change:
        row = found(getattr(change, noun)(key), noun, key)
        n = change.trust_count(row)
        confirm_cascade(f"{noun} {printable(key)}", {"trust(s)": n}, yes)
        change.remove_with_trusts(row)
        if also is not None:
            also(change)
        commit(ctx, change, f"{noun}.remove", f"{key} (and {n} trusts)")
    click.echo(f"{noun} {printable(key)} removed" + (f" with {n} trust(s)" if n else ""))


def options(opts):
    """One decorator applying a list of click options in their listed order (so a
    noun's `add` and `update` share one list)."""
    def deco(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
yes_option = click.option("--yes", is_flag=True, help="Also delete the records that depend on it.")


def option_values(values):
    """A repeatable option's values, without duplicates; a lone '' clears the list."""
    return [] if list(values) == [""] else list(dict.fromkeys(values))


def identifier_system(value, what="--identifier-system"):
    """An identifier system as --identifier-system and --match-identifier take it."""
    if not value or len(value) > 2048 or not value.isprintable() or any(c.isspace() for c in value) \
            or "|" in value:
        raise Fail(f"{what} must be a URI without spaces or '|': {printable(value)!r}")
    return value


def cli_flag(renamed: dict | None = None):
    """How a noun's shared option checks name an option in their messages: on the
    command line `--the-key` (or as renamed); `config apply` passes its own namer,
    which names the place in the file instead (`trusts[2].scopes`)."""
    renamed = renamed or {}
    return lambda key: renamed.get(key) or "--" + key.replace("_", "-")
