"""Engine creation and Alembic migrations. Schema changes happen only here."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from .settings import SettingsError


def _migrations() -> Path:
    """The Alembic scripts: inside the package when installed from a wheel, else the
    source tree's top-level migrations/ (a checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    shipped = here / "migrations"
    return shipped if (shipped / "env.py").is_file() else here.parent / "migrations"


MIGRATIONS = _migrations()
SETTING = "TOKEN_EXCHANGE_DATABASE_URL"
SQLITE_SIDECARS = ("-wal", "-shm", "-writer.lock")  # beside the database file (see store.hotpath.HotPath)
log = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    """A plain postgresql:// URL works: pick the installed psycopg 3 driver."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def check_url(url) -> str:
    """The database URL, normalised, or SettingsError: one line naming the setting and
    what is wrong with it, never the URL itself (it may hold a password). Only
    PostgreSQL and SQLite are supported."""
    if not isinstance(url, str) or not url.strip():
        raise SettingsError(f"{SETTING} is not a database URL; use postgresql://USER@HOST/DB or sqlite:///PATH")
    try:
        u = make_url(url)
    except ValueError as e:  # SQLAlchemy reads the port with int()
        if "int()" in str(e):
            raise SettingsError(f"{SETTING} has a port that is not a number") from None
        raise SettingsError(f"{SETTING} is not a database URL; use postgresql://USER@HOST/DB or sqlite:///PATH") from None
    except ArgumentError:
        raise SettingsError(f"{SETTING} is not a database URL; use postgresql://USER@HOST/DB or sqlite:///PATH") from None
    backend = u.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    if backend not in ("postgresql", "sqlite"):
        raise SettingsError(f"{SETTING} names the database {backend!r}; only PostgreSQL and SQLite are supported")
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if u.port is not None and not 0 < u.port < 65536:
        raise SettingsError(f"{SETTING} has a port outside 1-65535")
    try:
        dialect = u.get_dialect()
        dialect.import_dbapi()
    except (NoSuchModuleError, ImportError):
        raise SettingsError(f"{SETTING} asks for the driver {u.get_driver_name()!r}, which is not installed; "
                            "a plain postgresql:// URL uses psycopg 3") from None
    if getattr(dialect, "is_async", False):
        raise SettingsError(f"{SETTING} asks for the asynchronous driver {u.get_driver_name()!r}; "
                            "use a plain postgresql:// URL")
    return u.render_as_string(hide_password=False)


def _private_sqlite_files(path: str, create_folders: bool) -> None:
    """Files created by the service are its user's alone: the folders it creates (only
    the default instance folder's) 0700, the database and its sidecars 0600 (SQLite
    gives -wal and -shm the database file's mode). An existing database of looser mode,
    owned by this user, is tightened. SettingsError when the path cannot hold a
    database, and when a given URL's folder does not exist: nothing is created for a
    mistyped path (sqlite:///relative/x.db is relative to the working directory)."""
    db = Path(path)
    for ancestor in db.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise SettingsError(f"{SETTING} puts the SQLite database under {ancestor}, "
                                    "which is not a directory")
            break
    if not create_folders and not db.parent.is_dir():
        raise SettingsError(f"{SETTING} names an SQLite database in {db.parent.absolute()}, which does not exist; "
                            "create the folder, or give an absolute path (sqlite:////absolute/path.db)")
    try:
        os.makedirs(db.parent, mode=0o700, exist_ok=True)  # only the folders it creates get the mode
        if db.is_dir():
            raise SettingsError(f"{SETTING} names a directory, not an SQLite database file")
        if not db.exists():
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass  # another process made it meanwhile
    except OSError as e:
        raise SettingsError(f"{SETTING}: cannot create the SQLite database in {db.parent} "
                            f"({e.strerror or type(e).__name__})") from None
    uid = os.getuid() if hasattr(os, "getuid") else None
    for f in [db] + [Path(str(db) + s) for s in SQLITE_SIDECARS]:
        try:
            st = f.stat()
            if stat.S_IMODE(st.st_mode) & 0o077 and (uid is None or st.st_uid == uid):
                os.chmod(f, 0o600)
                log.warning("made a database file private (mode 0600)", extra={"path": str(f)})
        except OSError:
            continue  # absent (sidecars come and go), or not ours to change


def make_engine(url: str, create_folders: bool = False) -> Engine:
    """An engine for TOKEN_EXCHANGE_DATABASE_URL; SettingsError (one line) when the URL
    cannot be used. ``create_folders``: the default instance folder may be made."""
    url = check_url(url)
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:":
            _private_sqlite_files(path, create_folders)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # WAL: readers never wait for the writer; synchronous=NORMAL: a commit
            # is durable against a crash of the process (the audit guarantee),
            # without an fsync per record.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
        return engine
    return create_engine(url, pool_size=5, max_overflow=10, pool_pre_ping=True,
                         pool_recycle=1800, connect_args={"connect_timeout": 5})


def alembic_config(engine: Engine):
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Several instances starting at once: one migrates, the others wait.
            conn.execute(text("SELECT pg_advisory_xact_lock(8693)"))
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command
    with engine.begin() as conn:
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def revisions(engine: Engine) -> list:
    """The migrations, oldest first: (revision, one-line description)."""
    from alembic.script import ScriptDirectory
    script = ScriptDirectory.from_config(alembic_config(engine))
    return [(s.revision, (s.doc or "").strip().splitlines()[0] if s.doc else "")
            for s in reversed(list(script.walk_revisions()))]


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision; None for a database without one (empty)."""
    from alembic.runtime.migration import MigrationContext
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return MigrationContext.configure(conn).get_current_revision()


def is_current(engine: Engine) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return False
        return MigrationContext.configure(conn).get_current_revision() == head
