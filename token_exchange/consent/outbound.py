"""The consent flow's outbound calls (the EHR's discovery document, token endpoint
and JWKS), all through the project's one outbound client (``token_exchange.upstream``:
a total deadline, a size cap, bounded JSON, no cookies, no redirects).

Until that module is on this branch, a minimal stand-in with the same interface
(``get_json``/``post_form`` -> ``Reply``, ``UpstreamError``, ``Deadline``) keeps
the same bounds; ``make_upstream`` is the one place that chooses.
"""
from __future__ import annotations

try:  # the project's outbound client
    from ..upstream import Deadline, Reply, Upstream, UpstreamError  # noqa: F401
except ImportError:  # pragma: no cover - replaced when the hardening branch lands
    import json
    import time
    from typing import NamedTuple

    import requests

    class UpstreamError(Exception):
        def __init__(self, reason: str, status: int | None = None, url: str = ""):
            super().__init__(reason)
            self.reason, self.status, self.url = reason, status, url

    class Deadline:
        __slots__ = ("end",)

        def __init__(self, seconds: float):
            self.end = time.monotonic() + seconds

        def remaining(self) -> float:
            return self.end - time.monotonic()

    class Reply(NamedTuple):
        status: int
        headers: object
        json: object
        url: str

    class Upstream:
        def __init__(self, settings, metrics=None, max_bytes: int = 1024 * 1024):
            self.timeout, self.max_bytes = float(settings.http_timeout), max_bytes

        def get_json(self, url, headers=None, deadline=None, max_bytes=None):
            return self._call("GET", url, None, None, headers, deadline)

        def post_form(self, url, data, auth=None, headers=None, deadline=None, max_bytes=None):
            return self._call("POST", url, data, auth, headers, deadline)

        def _call(self, method, url, data, auth, headers, deadline):
            left = deadline.remaining() if isinstance(deadline, Deadline) else (deadline or self.timeout)
            if left <= 0:
                raise UpstreamError("deadline passed before the call", None, url)
            try:
                with requests.request(method, url, data=data, auth=auth, headers=headers, timeout=left,
                                      allow_redirects=False, stream=True) as r:
                    if not 200 <= r.status_code < 300:
                        return Reply(r.status_code, r.headers, None, url)
                    body = r.raw.read(self.max_bytes + 1, decode_content=True)
                    if len(body) > self.max_bytes:
                        raise UpstreamError("the answer is too large", r.status_code, url)
                    return Reply(r.status_code, r.headers, json.loads(body), url)
            except (requests.RequestException, OSError, ValueError) as e:
                raise UpstreamError(f"transport error ({type(e).__name__})", None, url) from None


def make_upstream(settings, metrics=None):
    return Upstream(settings, metrics)
