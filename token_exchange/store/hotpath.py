"""The precompiled hot path: the statements every exchange runs (link lookup,
consent lookup, audit insert), compiled once for the engine's dialect and run on
a kept DBAPI connection, with SQLite's writers ordered by flock(2) and, in
threaded workers, their audit commits grouped (``group_commit``, handed in by
whoever builds the store: never a module global). On PostgreSQL the kept
connections run in autocommit: a lookup is one round trip and an audit insert
one round trip and one commit (no BEGIN, no COMMIT of their own).

An audit write can be started and waited for apart (``send`` -> ``Pending.wait``),
so a request signs its token while its record is being committed: on PostgreSQL
the insert is sent with libpq's asynchronous calls and the server commits it
meanwhile; with group commit it joins the writer thread's next transaction. The
request still answers only after ``wait`` returns: the record is committed first."""
from __future__ import annotations

import logging
import os
import threading
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's busy handler alone
    fcntl = None

from sqlalchemy import bindparam, insert, select

from ..models import AuditEvent, Consent, PatientLink, UserLink
from . import libpq

log = logging.getLogger("token_exchange.store")
SQLITE_AUTOCHECKPOINT = 1000  # pages: SQLite's default, for every other connection
CHECKPOINT_EVERY = 500  # the hot path's commits between its own WAL checkpoints (SQLite; about as often as SQLite would)

# Hot-path statements, built once (Core on the tables: no ORM work per request).
_LINKS = PatientLink.__table__
_FIND_LINK = select(_LINKS.c.target_patient, _LINKS.c.origin, _LINKS.c.matched_at).where(
    _LINKS.c.source == bindparam("source"), _LINKS.c.patient == bindparam("patient"),
    _LINKS.c.target_id == bindparam("target_id"))
_USERS = UserLink.__table__
_FIND_USER_LINK = select(_USERS.c.target_user, _USERS.c.origin, _USERS.c.matched_at).where(
    _USERS.c.user == bindparam("user"), _USERS.c.target_id == bindparam("target_id"))
AUDIT_COLUMNS = [c.name for c in AuditEvent.__table__.c if c.name != "id"]
_CONSENT = Consent.__table__
# The active consent for one key: the ix_consent_key index (at most one row is active
# per key; the newest first should a race have left two).
_FIND_CONSENT = select(_CONSENT.c.id, _CONSENT.c.scopes, _CONSENT.c.expires).where(
    _CONSENT.c.issuer == bindparam("issuer"), _CONSENT.c.sub == bindparam("sub"),
    _CONSENT.c.client_id == bindparam("client_id"), _CONSENT.c.target_id == bindparam("target_id"),
    _CONSENT.c.source == bindparam("source"), _CONSENT.c.patient == bindparam("patient"),
    _CONSENT.c.withdrawn.is_(None)).order_by(_CONSENT.c.granted.desc())


class Compiled(NamedTuple):
    """A hot-path statement compiled for the engine's dialect: ``sql`` and the order of its
    parameters (None: the DBAPI takes them by name); on PostgreSQL also ``libpq``, the same
    statement with $n placeholders and their order, for libpq's own asynchronous calls."""
    sql: str
    names: list | None
    libpq: tuple | None = None


class HotPath:
    """The two statements every exchange runs (link lookup, audit insert), compiled
    once for the engine's dialect and run on a pooled DBAPI connection: the
    database does the same work, without SQLAlchemy's per-execute overhead.
    Driver errors surface as SQLAlchemy's DBAPIError (503 at the endpoint)."""

    def __init__(self, engine, group_commit: bool = False):
        from sqlalchemy import exc
        self.engine, self._exc = engine, exc
        dialect = engine.dialect
        self.find_link = self._compile(_FIND_LINK, dialect)
        self.find_consent = self._compile(_FIND_CONSENT, dialect)
        self.find_user_link = self._compile(_FIND_USER_LINK, dialect)
        # what the ORM would make of a DateTime column read raw (SQLite returns text)
        self.time_result = (_CONSENT.c.expires.type.dialect_impl(dialect).result_processor(dialect, None)
                            or (lambda v: v))
        # inline(): no RETURNING of the new row's id (nothing reads it)
        self.insert_audit = self._compile(
            insert(AuditEvent.__table__).values({c: bindparam(c) for c in AUDIT_COLUMNS}).inline(), dialect)
        time_type = AuditEvent.__table__.c.time.type.dialect_impl(dialect)  # e.g. SQLite's DATETIME, as the ORM writes it
        self.time_bind = time_type.bind_processor(dialect) or (lambda v: v)
        # a link's matched_at read raw (SQLite's DBAPI gives the stored text)
        self.matched_at_result = (_LINKS.c.matched_at.type.dialect_impl(dialect).result_processor(dialect, None)
                                  or (lambda v: v))
        # PostgreSQL: one connection per thread, so threads overlap their round trips.
        # SQLite: one connection per process, used by one thread at a time (a mutex):
        # its statements take microseconds, and every further connection in the
        # process would only add page-cache invalidations and lock traffic.
        self._local = threading.local() if dialect.name != "sqlite" else _ProcessLocal()
        self._mutex = threading.Lock() if dialect.name == "sqlite" else None
        # PostgreSQL: each statement is its own transaction (autocommit), so a lookup costs
        # one round trip and an audit insert one round trip and one commit; several
        # statements written together are wrapped in BEGIN ... COMMIT (_run).
        self._autocommit = dialect.name == "postgresql"
        # Threaded workers: the audit writes of requests that arrive together are committed
        # together (one transaction: on SQLite one writer-lock turn, on PostgreSQL one WAL
        # flush), each request still waiting for its own record's commit before it answers.
        self.group = GroupCommit(self) if group_commit else None
        path = engine.url.database if dialect.name == "sqlite" else None
        self._writer_lock_path = f"{path}-writer.lock" if fcntl and path and path != ":memory:" else None
        # SQLite: this connection's commits do not checkpoint the WAL themselves (a checkpoint
        # ends with an fsync, and inside a commit it would hold the writer lock meanwhile);
        # it checkpoints every CHECKPOINT_EVERY commits, after letting the lock go.
        self._checkpoints = dialect.name == "sqlite" and path not in (None, ":memory:")
        self._commits = 0

    @staticmethod
    def _compile(stmt, dialect):
        compiled = stmt.compile(dialect=dialect)
        names = list(compiled.positiontup) if dialect.positional else None
        libpq = None
        if dialect.name == "postgresql":
            dollar = stmt.compile(dialect=type(dialect)(paramstyle="numeric_dollar"))
            libpq = (dollar.string.encode(), list(dollar.positiontup))
        return Compiled(compiled.string, names, libpq)

    def close(self):
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and self._checkpoints:
            try:  # back to the pool as the engine's other connections are: checkpointing themselves
                conn.cursor().execute(f"PRAGMA wal_autocheckpoint={SQLITE_AUTOCHECKPOINT}").close()
            except self.engine.dialect.loaded_dbapi.Error:
                self._local.conn = conn
                self._drop(conn)
                return
        if conn is not None:
            if self._autocommit:
                try:  # back to the pool as the engine expects its connections: not autocommit
                    conn.driver_connection.autocommit = False
                except self.engine.dialect.loaded_dbapi.Error:
                    self._local.conn = conn
                    self._drop(conn)
                    return
            conn.close()
        lock = getattr(self._local, "writer_lock", None)
        self._local.writer_lock = None
        if lock is not None:
            lock.close()

    def _take_writer_lock(self):
        """SQLite has one write lock per database, and a writer that finds it taken
        sleeps in SQLite's busy handler for 1 ms or more, then retries: with two
        workers writing an audit record per exchange that idles a core often. The
        writers here queue on flock(2) of a sidecar file instead, which hands the
        turn over the moment it is free. (Writers outside the hot path, e.g. the
        CLI, still meet SQLite's own lock and busy timeout, as before.) The lock
        only orders writers, so where it cannot be had (the file cannot be opened,
        the filesystem refuses flock) SQLite's busy handler orders them alone.
        Returns the locked file, or None."""
        lock = getattr(self._local, "writer_lock", None)
        try:
            if lock is None:  # private to the service's user, like the database (db.make_engine)
                fd = os.open(self._writer_lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                lock = self._local.writer_lock = os.fdopen(fd, "ab")
            fcntl.flock(lock, fcntl.LOCK_EX)
            return lock
        except OSError as e:
            log.warning("no writer lock; SQLite's busy handler alone orders writers",
                        extra={"path": self._writer_lock_path, "reason": e.strerror})
            self._writer_lock_path = None
            self._local.writer_lock = None
            if lock is not None:
                lock.close()
            return None

    def run(self, statement, params, fetch=False, commit=False):
        """Each thread keeps one DBAPI connection for these statements (no pool
        checkout per request). A failure drops it; one retry on a fresh connection
        covers a database that restarted since."""
        return self._locked((_bind(statement, params),), fetch, commit)

    def write(self, statements):
        """(statement, params)... committed as one before this returns: with group
        commit, in a transaction shared with other threads' writes."""
        self.send(statements).wait()

    def send(self, statements) -> Pending:
        """(statement, params)... to be committed as one, started now: the caller goes on
        with its own work and calls ``wait()`` on the answer, which returns once they are
        committed (or raises what kept them from being, as ``write``). With group commit
        they join the writer thread's next transaction; a single statement on PostgreSQL
        is sent on the thread's connection and committed by the server meanwhile (libpq's
        asynchronous calls); otherwise (SQLite, whose commit is a local write, not a wait)
        they are written when ``wait()`` is called, as ``write`` would."""
        work = [_bind(statement, params) for statement, params in statements]
        if self.group is not None:
            return self.group.send(work)
        if self._autocommit and len(work) == 1:
            (statement, params), = statements
            sent = libpq.send(self, getattr(self._local, "conn", None), statement, params, work[0])
            if sent is not None:
                return sent
        return _Deferred(self, work)

    def run_all(self, statements, fetch=False, commit=False):
        """Several (statement, params) in one transaction; the last one's row if fetch."""
        return self._locked([_bind(statement, params) for statement, params in statements], fetch, commit)

    def _locked(self, work, fetch, commit):
        if self._mutex is None:
            return self._flocked(work, fetch, commit)
        with self._mutex:
            return self._flocked(work, fetch, commit)

    def _flocked(self, work, fetch, commit):
        lock = self._take_writer_lock() if commit and self._writer_lock_path else None
        try:
            return self._run(work, fetch, commit)
        finally:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
            if commit and self._checkpoints:
                self._commits += 1
                if self._commits % CHECKPOINT_EVERY == 0:
                    self._checkpoint()

    def _checkpoint(self):
        """SQLite: copy the WAL's committed pages into the database (PASSIVE: it waits for no
        reader or writer, and other writers go on meanwhile), outside the writer lock."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        try:
            conn.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").close()
        except self.engine.dialect.loaded_dbapi.Error as e:  # the next commit's checkpoint will try again
            log.warning("WAL checkpoint failed", extra={"reason": str(e)})

    def _run(self, work, fetch, commit):
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self.engine.raw_connection()
                if self._autocommit:
                    conn.driver_connection.autocommit = True
                if self._checkpoints:
                    conn.cursor().execute("PRAGMA wal_autocheckpoint=0").close()
            try:
                cur = conn.cursor()
                if self._autocommit:
                    row = self._run_autocommit(cur, work, fetch, commit)
                else:
                    for sql, args in work:
                        cur.execute(sql, args)
                    row = cur.fetchone() if fetch else None
                cur.close()
                if commit and not self._autocommit:
                    conn.commit()
                return row
            except dbapi_error as e:
                sql, args = work[-1]
                if isinstance(e, self.engine.dialect.loaded_dbapi.IntegrityError):
                    # The statement, not the connection: undo this transaction (it may hold
                    # the write lock) and keep the connection.
                    try:
                        conn.rollback()
                    except dbapi_error:
                        self._drop(conn)
                    raise self._exc.DBAPIError.instance(sql, args, e, dbapi_error) from None
                self._drop(conn)
                if attempt == 2:
                    raise self._exc.DBAPIError.instance(sql, args, e, dbapi_error) from None

    @staticmethod
    def _run_autocommit(cur, work, fetch, commit):
        """PostgreSQL in autocommit: one statement is its own transaction (one round trip,
        committed when it returns if it wrote); several that must commit together run
        in BEGIN ... COMMIT, consecutive ones of the same statement as one executemany
        (psycopg pipelines it: one round trip for all of them, e.g. a group commit)."""
        if len(work) == 1 or not commit:
            for sql, args in work:
                cur.execute(sql, args)
            return cur.fetchone() if fetch else None
        cur.execute("BEGIN")
        try:
            i = 0
            while i < len(work):
                j = i + 1
                while j < len(work) and work[j][0] == work[i][0]:
                    j += 1
                if j - i > 1:
                    cur.executemany(work[i][0], [args for _, args in work[i:j]])
                else:
                    cur.execute(*work[i])
                i = j
            row = cur.fetchone() if fetch else None
            cur.execute("COMMIT")
        except BaseException:
            try:
                cur.connection.rollback()
            except Exception:  # noqa: BLE001 - the connection is gone; the first error says why
                pass
            raise
        return row

    def _drop(self, conn):
        """Forget a broken connection, closing it so it holds no lock."""
        self._local.conn = None
        try:
            conn.invalidate()
        except Exception:  # noqa: BLE001 - the connection is already gone
            pass


class Pending:
    """A write under way (HotPath.send): ``wait()`` returns once it is committed, or raises
    what kept it from being. This one was done when it was made."""
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None = None):
        self.error = error

    def wait(self) -> None:
        if self.error is not None:
            raise self.error


class _Deferred(Pending):
    """A write done when waited for (HotPath.send where nothing is gained by starting it early)."""
    __slots__ = ("hot", "work")

    def __init__(self, hot, work):
        super().__init__()
        self.hot, self.work = hot, work

    def wait(self) -> None:
        work, self.work = self.work, None
        if work is not None:
            self.hot._locked(work, False, True)


def _bind(statement, params) -> tuple:
    """(sql, arguments in the DBAPI's order) of a compiled statement and its parameters."""
    return statement.sql, (tuple(params[n] for n in statement.names) if statement.names is not None else params)


class GroupCommit:
    """One writer thread per process that commits the audit records of every request
    waiting at that moment in one transaction (SQLite: one writer-lock turn; PostgreSQL:
    one WAL flush, the inserts pipelined in one round trip). A request returns only once its own
    record is committed (or with the error that kept it from being), so the contract's
    "committed before the response" holds; under load a commit and a writer-lock turn
    serve several requests. When a shared transaction fails, each record is tried on
    its own, so one bad record never costs the others theirs."""

    def __init__(self, hot):
        self.hot = hot
        self.cv = threading.Condition()
        self.queue: list = []
        self.thread = None

    def send(self, work) -> Pending:
        """Queued for the writer's next transaction; ``wait()`` on the answer."""
        item = _Queued(work)
        with self.cv:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, daemon=True, name="token-exchange-audit")
                self.thread.start()
            self.queue.append(item)
            self.cv.notify()
        return item

    def _loop(self):
        while True:
            with self.cv:
                while not self.queue:
                    self.cv.wait()
                batch, self.queue = self.queue, []
            try:
                self.hot._locked([w for item in batch for w in item.work], False, True)
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                if len(batch) == 1:
                    batch[0].error = e
                else:
                    for item in batch:
                        try:
                            self.hot._locked(item.work, False, True)
                        except Exception as one:  # noqa: BLE001
                            item.error = one
            for item in batch:
                item.done.set()


class _Queued(Pending):
    """A write queued for the group commit's writer thread."""
    __slots__ = ("work", "done")

    def __init__(self, work):
        super().__init__()
        self.work, self.done = work, threading.Event()

    def wait(self) -> None:
        self.done.wait()
        super().wait()


class _ProcessLocal:
    """threading.local's interface, one value for the whole process (SQLite's shared
    hot-path connection and writer-lock file; guarded by HotPath's mutex)."""

