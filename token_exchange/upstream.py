"""The one outbound HTTP client: every call to an EHR, a vendor or a FHIR server
goes through ``Upstream``.

What one call may cost, whatever the other side does (docs/SECURITY.md,
"Resource model"):

- time: a total deadline for connect, request, headers and the whole body. A
  server that trickles its answer byte by byte is cut off at the deadline: a
  watchdog thread shuts the call's socket down when it passes, which ends any
  read blocked on it (a socket timeout alone bounds each read, not the sum).
  Several calls may share one ``Deadline``.
- memory: the body is read in chunks and refused past ``max_bytes`` (1 MiB by
  default); JSON is decoded only from a body within the cap, refused past
  ``MAX_JSON_DEPTH`` levels of nesting (and never raises RecursionError).
- state: no cookie is ever kept (the jar's policy refuses them all), redirects
  are not followed (a 3xx is an answer like any other), no retries.

Failures raise one typed ``UpstreamError`` carrying a reason and the HTTP
status for the log; URLs are logged without credentials (``redact``).
"""
from __future__ import annotations

import heapq
import http.client
import http.cookiejar
import itertools
import json
import logging
import os
import socket
import threading
import time
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3
import urllib3.connection
from requests.adapters import HTTPAdapter

from .jose import no_constants

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32
_CHUNK = 16 * 1024
_RECHECK = 0.05  # a watchdog that fires before the socket exists looks again this much later


class Slots:
    """At most ``n`` callers of this process wait on upstreams at once; one more is told
    at once (``take`` returns False) rather than queued, so a slow upstream can hold
    only ``n`` request threads. Release what was taken with ``give_back``."""

    def __init__(self, n: int):
        self._sem = threading.BoundedSemaphore(n)

    def take(self) -> bool:
        return self._sem.acquire(blocking=False)

    def give_back(self) -> None:
        self._sem.release()


class UpstreamError(Exception):
    """An outbound call that did not give a usable answer. ``reason`` is short and
    safe to log (no URL credentials, no body); ``status`` the HTTP status, if any."""

    def __init__(self, reason: str, status: int | None = None, url: str = ""):
        super().__init__(reason)
        self.reason, self.status, self.url = reason, status, url

    def __str__(self):
        where = f" ({self.url})" if self.url else ""
        status = f" HTTP {self.status}" if self.status is not None else ""
        return f"{self.reason}{status}{where}"


class Deadline:
    """A point in time that one or several outbound calls must finish by."""
    __slots__ = ("end",)

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()


class Reply(NamedTuple):
    status: int
    headers: object  # case-insensitive mapping
    json: object  # the decoded body of a 2xx answer; None for other statuses
    url: str  # redacted


def redact(url: str) -> str:
    """A URL fit for logs and messages: no user:password@, no query string."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))
    except ValueError:
        return "<malformed URL>"


def decode_json(body: bytes, max_depth: int = MAX_JSON_DEPTH):
    """JSON from an upstream, bounded: ValueError for anything that is not JSON
    (RFC 8259: no NaN or Infinity), nested deeper than max_depth, or so deep that
    the decoder itself gives up."""
    try:
        doc = json.loads(body, parse_constant=no_constants)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    stack = [(doc, 1)]
    while stack:  # iterative: the depth check itself must not recurse
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if depth > max_depth:
            raise ValueError("JSON nested too deeply")
        stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return doc


class _RefuseAllCookies(http.cookiejar.DefaultCookiePolicy):
    """No upstream may leave state in this process (a cookie jar that only grows)."""

    def set_ok(self, cookie, request):
        return False

    def return_ok(self, cookie, request):
        return False


# -- the total deadline -----------------------------------------------------------
class _Watch:
    """One call in flight: its deadline, and the connection and socket it uses (the
    response keeps reading from the socket after http.client drops conn.sock)."""
    __slots__ = ("end", "conn", "sock", "done", "fired")

    def __init__(self, end: float):
        self.end, self.conn, self.sock, self.done, self.fired = end, None, None, False, False

    def fire(self) -> bool:
        """Cut the call off; True when it must be tried again (no socket yet)."""
        self.fired = True
        sock = self.sock or getattr(self.conn, "sock", None)
        if sock is None:
            return not self.done
        try:
            # socket.socket's own shutdown, also for an SSLSocket: the reading
            # thread then meets end-of-file instead of an unwrapped TLS object.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except (OSError, TypeError, ValueError):
            pass
        return False


class _Watchdog:
    """One daemon thread per process that cuts off calls past their deadline."""

    def __init__(self):
        self._cv = threading.Condition()
        self._heap: list = []
        self._seq = itertools.count()
        self._pid = None

    def watch(self, end: float) -> _Watch:
        w = _Watch(end)
        with self._cv:
            if self._pid != os.getpid():  # first use in this process (gunicorn forks)
                self._pid, self._heap = os.getpid(), []
                threading.Thread(target=self._run, name="upstream-watchdog", daemon=True).start()
            heapq.heappush(self._heap, (end, next(self._seq), w))
            self._cv.notify()
        return w

    def _run(self):
        while True:
            due = []
            with self._cv:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, w = heapq.heappop(self._heap)
                    if not w.done:
                        due.append(w)
                if not due:
                    self._cv.wait(self._heap[0][0] - now if self._heap else None)
            for w in due:
                if w.fire():
                    with self._cv:
                        heapq.heappush(self._heap, (time.monotonic() + _RECHECK, next(self._seq), w))


_WATCHDOG = _Watchdog()
_current = threading.local()  # the _Watch of the call this thread is making


class _WatchedConnection:
    """Connections that hand the socket they open to the watch of the call."""

    def connect(self):
        super().connect()
        w = getattr(_current, "watch", None)
        if w is not None:
            w.sock = self.sock


class _HTTPConnection(_WatchedConnection, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _WatchedPool:
    """Connection pools that hand the (possibly reused) connection to the watch."""

    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout)
        w = getattr(_current, "watch", None)
        if w is not None:
            w.conn, w.sock = conn, getattr(conn, "sock", None)
        return conn


class _HTTPPool(_WatchedPool, urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(_WatchedPool, urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if hasattr(manager, "pool_classes_by_scheme"):
            manager.pool_classes_by_scheme = _POOLS
        return manager


_TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                     OSError, ValueError)


class Upstream:
    """``Upstream(settings, metrics).get_json(url, headers=..., deadline=...)`` and
    ``.post_form(url, data, auth=..., deadline=...)`` -> ``Reply``; raise
    ``UpstreamError``. ``deadline`` is seconds or a shared ``Deadline``; by
    default TOKEN_EXCHANGE_HTTP_TIMEOUT."""

    def __init__(self, settings, metrics=None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.timeout = float(settings.http_timeout)
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.session = requests.Session()
        self.session.cookies.set_policy(_RefuseAllCookies())
        self.session.max_redirects = 0
        adapter = _Adapter(max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"User-Agent": "token-exchange", "Accept": "application/json",
                                     "Accept-Encoding": "identity"})

    def deadline(self, seconds: float | None = None) -> Deadline:
        return Deadline(self.timeout if seconds is None else seconds)

    def get_json(self, url: str, headers=None, deadline=None, max_bytes: int | None = None) -> Reply:
        return self._call("GET", url, headers=headers, deadline=deadline, max_bytes=max_bytes)

    def post_form(self, url: str, data: dict, auth=None, headers=None, deadline=None,
                  max_bytes: int | None = None) -> Reply:
        return self._call("POST", url, data=data, auth=auth, headers=headers, deadline=deadline,
                          max_bytes=max_bytes)

    # -----------------------------------------------------------------------------
    def _call(self, method, url, data=None, auth=None, headers=None, deadline=None, max_bytes=None) -> Reply:
        shown = redact(url)
        if deadline is None:
            deadline = Deadline(self.timeout)
        elif not isinstance(deadline, Deadline):
            deadline = Deadline(float(deadline))
        cap = self.max_bytes if max_bytes is None else max_bytes
        try:
            status, reply_headers, body = self._fetch(method, url, data, auth, headers, deadline, cap, shown)
            doc = None
            if 200 <= status < 300:
                try:
                    doc = decode_json(body)
                except ValueError:
                    raise UpstreamError("the answer is not JSON (or is nested too deeply)", status, shown) from None
            return Reply(status, reply_headers, doc, shown)
        except UpstreamError as e:
            self._count("upstream_failures")
            log.warning("upstream call failed", extra={"url": shown, "reason": e.reason, "status": e.status})
            raise

    def _fetch(self, method, url, data, auth, headers, deadline, cap, shown):
        left = deadline.remaining()
        if left <= 0:
            raise UpstreamError("deadline passed before the call", None, shown)
        watch = _WATCHDOG.watch(deadline.end)
        _current.watch = watch
        r = None
        try:
            r = self.session.request(method, url, data=data, auth=auth, headers=headers,
                                     timeout=(left, left), allow_redirects=False, stream=True)
            _current.watch = None
            declared = r.headers.get("Content-Length", "")
            # 1*DIGIT, ASCII only (RFC 9110 §8.6; str.isdigit takes any script's digits)
            if declared.isascii() and declared.isdigit() and len(declared) < 19 and int(declared) > cap:
                raise UpstreamError(f"the answer is larger than {cap} bytes", r.status_code, shown)
            if not 200 <= r.status_code < 300:
                return r.status_code, r.headers, b""  # its body is not read
            chunks, size = [], 0
            for chunk in r.raw.stream(_CHUNK, decode_content=True):
                size += len(chunk)
                if size > cap:
                    raise UpstreamError(f"the answer is larger than {cap} bytes", r.status_code, shown)
                chunks.append(chunk)
            if watch.fired:
                raise UpstreamError("deadline passed", r.status_code, shown)
            return r.status_code, r.headers, b"".join(chunks)
        except _TRANSPORT_ERRORS as e:
            if watch.fired or deadline.remaining() <= 0:
                raise UpstreamError("deadline passed", getattr(r, "status_code", None), shown) from None
            raise UpstreamError(f"transport error ({type(e).__name__})", getattr(r, "status_code", None),
                                shown) from None
        finally:
            watch.done = True
            _current.watch = None
            if r is not None:
                r.close()

    def _count(self, name):
        if self.metrics is not None:
            self.metrics.inc(name)
