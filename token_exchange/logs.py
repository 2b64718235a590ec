"""Structured JSON logs. Never a token or a secret: callers log reasons and ids only."""
from __future__ import annotations

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


def current_request_id():
    """This request's id, made on first use (a log line or the response header) and
    kept in the WSGI environ for the rest of the request."""
    try:
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

    def format(self, record):
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        out = {"time": self._stamp, "level": record.levelname.lower(), "logger": record.name,
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


def configure(level=logging.INFO):
    root = logging.getLogger("token_exchange")
    if any(isinstance(h.formatter, JSONFormatter) for h in root.handlers):
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JSONFormatter())
    root.addHandler(h)
    root.setLevel(level)
    root.propagate = False
