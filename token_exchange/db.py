"""Engine creation and Alembic migrations. Schema changes happen only here."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url

def _migrations() -> Path:
    """The Alembic scripts: inside the package when installed from a wheel, else the
    source tree's top-level migrations/ (a checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    shipped = here / "migrations"
    return shipped if (shipped / "env.py").is_file() else here.parent / "migrations"


MIGRATIONS = _migrations()


def normalize_url(url: str) -> str:
    """A plain postgresql:// URL works: pick the installed psycopg 3 driver."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
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


def is_current(engine: Engine) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return False
        return MigrationContext.configure(conn).get_current_revision() == head
