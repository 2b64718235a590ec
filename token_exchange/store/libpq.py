"""PostgreSQL writes sent now and collected later: libpq's asynchronous calls (psycopg's
``pq``) on the hot path's kept connection, so the server commits a record while the worker
goes on (HotPath.send; the token pipeline signs its token meanwhile). The statement is
prepared once per connection; its parameters go in PostgreSQL's text format. Errors
surface as HotPath's other errors do: SQLAlchemy's DBAPIError over the psycopg error."""
from __future__ import annotations

import logging
import select
from datetime import datetime

log = logging.getLogger("token_exchange.store")


def send(hot, conn, statement, params, work):
    """Sends one statement on ``conn`` (the thread's kept connection) and returns at once:
    a ``Sent`` to wait on. None when it could not be sent (no connection yet, or one the
    server has closed since: it is dropped, and the caller writes the usual way, which
    opens a fresh one)."""
    import psycopg
    from psycopg import pq

    from .hotpath import Pending
    if conn is None or statement.libpq is None:
        return None
    sql, names = statement.libpq
    try:
        values = [text(params[n]) for n in names]
    except psycopg.DataError as e:  # what the server would refuse: refused here, the connection kept
        return Pending(hot._exc.DBAPIError.instance(work[0], work[1], e, psycopg.Error))
    pgconn = conn.driver_connection.pgconn
    try:
        pgconn.consume_input()  # what the server sent while the connection was idle (it closed it?)
        if pgconn.status != pq.ConnStatus.OK or pgconn.transaction_status != pq.TransactionStatus.IDLE:
            raise psycopg.OperationalError("the connection is not idle")
        pgconn.send_query_prepared(prepared_on(conn, pgconn, sql), values)
        while pgconn.flush():  # 1: the socket's buffer is full; wait until it takes the rest
            wait_for(pgconn.socket, select.POLLOUT)
    except (psycopg.Error, OSError) as e:
        log.warning("dropping a database connection that could not send", extra={"reason": str(e)})
        hot._drop(conn)
        return None
    return Sent(hot, conn, work)


class Sent:
    """A statement sent on the thread's connection, its result not read yet (a
    hotpath.Pending). Read it (``wait``) before the thread runs anything else on that
    connection."""
    __slots__ = ("hot", "conn", "work")

    def __init__(self, hot, conn, work):
        self.hot, self.conn, self.work = hot, conn, work

    def wait(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            collect(self.hot, conn, self.work)


def collect(hot, conn, work) -> None:
    """The results of a statement ``send`` sent, through the server's ReadyForQuery (after
    the commit: its WAL flushed). A server error raises as HotPath's other errors do
    (DBAPIError; IntegrityError for a constraint) and keeps the connection. A connection
    found broken before any result came back is dropped and the statement written again on
    a fresh one, as HotPath.run retries (a server that closed the connection while it sat
    idle never read it); broken after a result, it raises."""
    import psycopg
    from psycopg import pq
    pgconn = conn.driver_connection.pgconn
    error, answered = None, False
    try:
        while True:
            pgconn.consume_input()
            if pgconn.is_busy():
                wait_for(pgconn.socket, select.POLLIN)
                continue
            result = pgconn.get_result()
            if result is None:
                break
            answered = True
            if error is None and result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                error = server_error(result)
    except (psycopg.Error, OSError) as e:
        hot._drop(conn)
        if not answered:
            log.warning("a database connection closed under a write; writing it again on a fresh one",
                        extra={"reason": str(e)})
            hot._locked([work], False, True)
            return
        error = e if isinstance(e, psycopg.Error) else psycopg.OperationalError(str(e))
    if error is not None:
        sql, args = work
        raise hot._exc.DBAPIError.instance(sql, args, error, psycopg.Error) from None


def prepared_on(conn, pgconn, sql: bytes) -> bytes:
    """The name of ``sql`` prepared on this connection (PREPARE once per connection: the
    pool's record of it keeps the names while the connection lives)."""
    from psycopg import pq
    prepared = conn.info.setdefault("token_exchange_prepared", {})
    name = prepared.get(sql)
    if name is None:
        name = f"token_exchange_{len(prepared)}".encode()
        result = pgconn.prepare(name, sql)
        if result.status != pq.ExecStatus.COMMAND_OK:
            raise server_error(result)
        prepared[sql] = name
    return name


def wait_for(fd: int, event: int) -> None:
    """Until the socket ``fd`` is readable (POLLIN) or writable (POLLOUT); poll(2), which
    takes any descriptor number (select(2) stops at 1024)."""
    poller = select.poll()
    poller.register(fd, event)
    poller.poll()


def text(value) -> bytes | None:
    """A parameter in PostgreSQL's text format (the server casts it to the column's type).
    Only the types the hot path writes; a NUL is refused as psycopg refuses it (libpq
    would cut the text short there)."""
    if value is None:
        return None
    if isinstance(value, str):
        if "\x00" in value:
            import psycopg
            raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        return value.encode()
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, (int, datetime)):
        return (value.isoformat() if isinstance(value, datetime) else str(value)).encode()
    raise TypeError(f"the hot path cannot send a {type(value).__name__}")


def server_error(result):
    """The psycopg exception for a failed libpq result: its SQLSTATE's class
    (UniqueViolation for a unique index, say), with the server's message."""
    import psycopg
    from psycopg import errors, pq
    sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
    message = (result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"the statement failed").decode(
        errors="replace")
    try:
        cls = errors.lookup(sqlstate.decode()) if sqlstate else psycopg.OperationalError
    except KeyError:
        cls = psycopg.DatabaseError
    return cls(message)
