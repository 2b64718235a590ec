"""Structured JSON logs. Never a token or a secret: callers log reasons and ids only."""
from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import time

from flask import has_request_context, request

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")


def request_id(incoming: str | None) -> str:
    """The caller's X-Request-Id when it is a plain token, else a new one (128 random bits, hex)."""
    return incoming if incoming and _REQUEST_ID.match(incoming) else os.urandom(16).hex()


_ENVIRON_KEY = "token_exchange.request_id"
# The WSGI environ of the request being served outside Flask's request context
# (endpoints.TokenEndpoint, the hot path); Flask's own requests are found through it.
current_environ: contextvars.ContextVar = contextvars.ContextVar("token_exchange_environ", default=None)


def current_request_id():
    """This request's id, made on first use (a log line or the response header) and
    kept in the WSGI environ for the rest of the request."""
    try:
        environ = current_environ.get()
        if environ is None:
            if not has_request_context():
                return None
            environ = request.environ
        rid = environ.get(_ENVIRON_KEY)
        if rid is None:
            rid = environ[_ENVIRON_KEY] = request_id(environ.get("HTTP_X_REQUEST_ID"))
        return rid
    except Exception:  # noqa: BLE001 - logging must never fail
        return None


class JSONFormatter(logging.Formatter):
    """One JSON object per line. The timestamp text is made once per second, not per line."""
    _second, _stamp = None, None

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        return self._stamp

    def format(self, record):
        out = {"time": self.stamp(record.created), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        rid = current_request_id()
        if rid:
            out["request_id"] = rid
        for k, v in record.__dict__.items():
            if k not in _STD and k[0] != "_":
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, default=str)


def configure(level=logging.INFO, server=False):
    """The service's JSON lines on stderr. Under the admin CLI (``quiet()``) nothing is
    installed unless ``server`` (`token-exchange serve`): the CLI's terminal gets one
    ``error:`` line per failure, not the library's log lines."""
    # Our JSON lines carry none of the caller's file and line: do not let every record look
    # them up (the logging HOWTO's "Optimization"). Process and thread stay on the records:
    # other formatters in the process (gunicorn's, a host application's) may use them.
    logging._srcfile = None
    global _handler
    root = logging.getLogger("token_exchange")
    if any(isinstance(h.formatter, JSONFormatter) for h in root.handlers):
        return
    if _QUIET in root.handlers:
        if not server:
            return
        root.removeHandler(_QUIET)
    h = _handler = logging.StreamHandler(sys.stderr)
    h.setFormatter(JSONFormatter())
    root.addHandler(h)
    root.setLevel(level)
    root.propagate = False


_handler = None  # the JSON handler configure() installed
_QUIET = logging.NullHandler()  # quiet()'s: the library's lines go nowhere


def quiet():
    """The admin CLI's policy: the library's log lines (an upstream call failed, a file
    made private) never reach the terminal, where a failure is one ``error:`` line.
    Without a handler, Python's last-resort handler would print every warning to stderr.
    Returns a function that undoes it (for a command run in-process, as tests do)."""
    root = logging.getLogger("token_exchange")
    if _QUIET in root.handlers or (_handler is not None and _handler in root.handlers):
        return lambda: None
    propagate = root.propagate
    root.addHandler(_QUIET)
    root.propagate = False

    def undo():
        if _QUIET in root.handlers:
            root.removeHandler(_QUIET)
            root.propagate = propagate
    return undo


def info_line(logger: logging.Logger, msg: str, fields: dict) -> None:
    """logger.info(msg, extra=fields), the same JSON line, made without a LogRecord
    when the line goes only to the handler configure() installed (one line per
    decision is on every request's path). Any other set-up (a handler added to the
    logger, another level) goes through logging as usual."""
    if not logger.isEnabledFor(logging.INFO):
        return
    h = _handler
    if h is None or logger.handlers or logger.parent.handlers != [h] or logger.parent.propagate \
            or h.level > logging.INFO or h.filters:
        logger.info(msg, extra=fields)
        return
    out = {"time": h.formatter.stamp(time.time()), "level": "info", "logger": logger.name, "msg": msg}
    rid = current_request_id()
    if rid:
        out["request_id"] = rid
    out.update(fields)
    line = json.dumps(out, default=str) + "\n"
    with h.lock:
        try:
            h.stream.write(line)
            h.stream.flush()
        except Exception:  # noqa: BLE001 - as logging.Handler.handleError: logging must never fail
            pass
