"""`token-exchange serve`: gunicorn's threaded worker (gthread) with the application factory.

Threads, not processes alone: /jwks and discovery answer while other requests wait
on a slow upstream (each call bounded by TOKEN_EXCHANGE_HTTP_TIMEOUT), and a
connection that is open but idle (a browser's spare keep-alive connection, a new
connection that has sent nothing yet) waits in the worker's poller, not in a thread.

Slow clients cannot hold threads: a client has TOKEN_EXCHANGE_REQUEST_READ_TIMEOUT
seconds (default 10) from its first byte to send the request line, the headers and
the body; every read from its socket waits at most what is left of that, and past
it the connection is dropped. The body (at most the 64 KiB the service accepts, plus
one byte to tell a larger one) is read before the application runs, so the
application never waits on a client. Connections are closed without lingering to
drain what a client still sends, so no client can hold the worker's main loop.
A buffering reverse proxy in front is still the first defence (docs/OPERATIONS.md).

The server owns a private directory for the workers' metrics (prometheus_client's
multiprocess mode), so a scrape answered by any worker reports the sum over all;
it logs one line at start (address, issuer, database without its password,
workers) and one at shut-down.
"""
from __future__ import annotations

import errno
import gc
import json
import logging
import os
import selectors
import shutil
import socket
import tempfile
import time
from functools import partial

from gunicorn import glogging, util
from gunicorn.app.base import BaseApplication
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.errors import NoMoreData
from gunicorn.http.unreader import IterUnreader
from gunicorn.workers import gthread

log = logging.getLogger("token_exchange.server")


class _ReadDeadline(NoMoreData):
    """The client did not send its whole request in time (gunicorn closes the
    connection quietly on NoMoreData, as for a client that went away)."""


class _DeadlineSocket:
    """The client's socket as the request parser reads it: each recv() waits at most
    until the connection's read deadline; everything else is the socket's own."""
    __slots__ = ("_sock", "_conn")

    def __init__(self, sock, conn):
        self._sock, self._conn = sock, conn

    def recv(self, size, *flags):
        deadline = self._conn.read_deadline
        if deadline is None:
            return self._sock.recv(size, *flags)
        left = deadline - time.monotonic()
        if left <= 0:
            self._conn.timed_out = True
            raise _ReadDeadline()
        self._sock.settimeout(left)
        try:
            return self._sock.recv(size, *flags)
        except socket.timeout:
            self._conn.timed_out = True
            raise _ReadDeadline() from None
        finally:
            self._sock.settimeout(None)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Conn(gthread.TConn):
    read_deadline: float | None = None
    timed_out = False

    def init(self):
        super().init()
        unreader = getattr(self.parser, "unreader", None)
        if unreader is not None and hasattr(unreader, "sock") and not isinstance(unreader.sock, _DeadlineSocket):
            unreader.sock = _DeadlineSocket(self.sock, self)

    def close(self, graceful=False):
        """Half-close, take what the client already sent (so the kernel need not reset
        the connection under the response), then close: never wait for more."""
        if graceful:
            try:
                self.sock.shutdown(socket.SHUT_WR)
                self.sock.setblocking(False)
                for _ in range(16):
                    if not self.sock.recv(4096):
                        break
            except OSError:
                pass
        util.close(self.sock)


# gunicorn's own answers, by status: what the client should fix (its HTML page says only
# the reason phrase and may repeat the client's bytes).
_PROTOCOL_ERRORS = {
    400: "The request is not valid HTTP/1.1: check the request line and the headers (a header name is a token; "
         "no control characters in names or values).",
    403: "The request is refused.",
    408: "The request was not sent in time.",
    414: "The request line is too long.",
    417: "Only Expect: 100-continue is supported.",
    431: "The request's header fields are too large or too many.",
    501: "The request's Transfer-Encoding is not supported; send the body with Content-Length.",
}


def write_json_error(sock, status: int, reason: str) -> None:
    """An error gunicorn answers itself, as the service answers its own (endpoints.error_answer's
    shape): {"error", "error_description"}, JSON, never cached; the connection closes."""
    error = "server_error" if status >= 500 and status != 501 else "invalid_request"
    description = _PROTOCOL_ERRORS.get(status, "An unexpected error occurred." if error == "server_error"
                                       else f"{reason}.")
    body = json.dumps({"error": error, "error_description": description}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Cache-Control: no-store\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


class _ErrorPage:
    """Stands in for the client's socket while gunicorn's handle_error writes its HTML
    page: the page is kept, not sent; only its status line is read."""

    def __init__(self):
        self.data = b""

    def gettimeout(self):
        return 0.0

    def setblocking(self, flag):
        pass

    def sendall(self, data):
        self.data += data

    def status(self) -> tuple[int, str] | None:
        version, _, rest = self.data.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        code, _, reason = rest.partition(" ")
        return (int(code), reason) if version.startswith("HTTP/") and code.isascii() and code.isdigit() else None


class ThreadWorker(gthread.ThreadWorker):
    read_timeout = 10.0  # set by run() from the settings, before the workers fork
    max_body = 64 * 1024

    def accept(self, listener):
        """A new connection waits in the poller until it sends something (gthread
        would park a thread on it for up to 5 s)."""
        if not hasattr(self, "pending_conns") or not hasattr(self, "on_pending_socket_readable"):
            return super().accept(listener)  # an older gthread: its own way
        try:
            client, addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = _Conn(self.cfg, client, addr, listener.getsockname())  # non-blocking
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))

    def handle(self, conn):
        """One request on conn, read within the read deadline from now."""
        conn.read_deadline, conn.timed_out = time.monotonic() + self.read_timeout, False
        result = super().handle(conn)
        if conn.timed_out:
            self._drop(conn)
            return False
        return result

    def handle_error(self, req, client, addr, exc):
        """gunicorn's own answers (a request line or header it cannot parse, a request too
        large) as the service's JSON errors, not its HTML page: gunicorn decides the status
        and logs as it always does; only the page is replaced."""
        page = _ErrorPage()
        super().handle_error(req, page, addr, exc)
        answer = page.status()
        if answer is None:
            return
        try:
            write_json_error(client, *answer)
        except Exception:  # noqa: BLE001 - the client went away: as gunicorn, nothing more to do
            self.log.debug("Failed to send error message.")

    def handle_request(self, req, conn):
        """Read the whole body (within the deadline) before the application runs."""
        try:
            self._buffer_body(req, conn)
        except NoMoreData:
            if conn.timed_out:
                try:
                    write_json_error(conn.sock, 408, "Request Timeout")
                except OSError:
                    pass
            return False
        finally:
            conn.read_deadline = None
        return super().handle_request(req, conn)

    def _buffer_body(self, req, conn):
        if getattr(req, "_expected_100_continue", False):
            conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # RFC 9110 §10.1.1, before the body is read
            req._expected_100_continue = False
        data = req.body.read(self.max_body + 1)
        if len(data) > self.max_body:
            req.must_close = True  # the rest stays unread on the socket: no reuse
        req.body = Body(LengthReader(IterUnreader([data]), len(data)))

    @staticmethod
    def _drop(conn):
        """Close a connection past its read deadline now, in this thread."""
        try:
            socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
        except (OSError, TypeError):
            pass
        util.close(conn.sock)


class JSONLogger(glogging.Logger):
    """gunicorn's own lines (the master's warnings, a worker's errors) as JSON lines, in
    the same format as the service's (logs.JSONFormatter)."""

    def _set_handler(self, log, output, fmt, stream=None):
        from .logs import JSONFormatter
        super()._set_handler(log, output, JSONFormatter(), stream)


class _App(BaseApplication):
    def __init__(self, options):
        self.options = options
        super().__init__()

    def load_config(self):
        for k, v in self.options.items():
            self.cfg.set(k, v)

    def load(self):
        from . import create_app  # in each worker, after the fork
        return create_app(group_commit=self.options["threads"] > 1)


def _pre_fork(server, worker):
    """What the master holds (every module imported) moves to the collector's permanent
    generation before a worker forks (as the gc module's documentation advises), so that a
    worker's collections never visit those objects: no copy-on-write of the shared pages, and
    a worker that exits does not spend seconds collecting the whole inherited heap."""
    gc.freeze()


def _child_exit(server, worker):
    """A worker's live gauges go with it; its counts stay in the sum."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def run(host: str, port: int, workers: int, settings=None) -> None:
    from . import logs
    from .settings import Settings
    logs.configure()
    settings = settings or Settings.from_env()
    ThreadWorker.read_timeout = float(settings.request_read_timeout)  # before the workers fork
    ThreadWorker.max_body = settings.max_body
    metrics_dir = tempfile.mkdtemp(prefix="token-exchange-metrics-")  # 0700, empty: counts start at zero
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    master = os.getpid()

    def remove_metrics_dir():
        if os.getpid() == master:  # workers are forked inside run(): they must not remove it on their exit
            shutil.rmtree(metrics_dir, ignore_errors=True)
    from sqlalchemy.engine import make_url
    log.info("starting", extra={"address": f"{host}:{port}", "issuer": settings.issuer, "workers": workers,
                                "threads": settings.worker_threads,
                                "database": make_url(settings.database_url).render_as_string(hide_password=True)})

    def on_exit(server):
        remove_metrics_dir()
        log.info("stopped", extra={"address": f"{host}:{port}"})
    try:
        _App({"bind": f"{host}:{port}", "workers": workers, "worker_class": ThreadWorker,
              "threads": settings.worker_threads, "graceful_timeout": 20, "timeout": 30, "keepalive": 5,
              "accesslog": None, "errorlog": "-", "loglevel": "warning", "logger_class": JSONLogger,
              "child_exit": _child_exit, "on_exit": on_exit, "pre_fork": _pre_fork}).run()
    finally:
        remove_metrics_dir()
