"""A real FHIR search implementation for tests: Medplum's FhirRouter and in-memory
repository behind a bearer-JWT check (tests/fhir_server/server.js, Node), started as a
subprocess on loopback; and a loopback JWKS endpoint that tests fill with public keys.

The Node server needs `node` (>= 20.19) on PATH and `npm ci --prefix tests/fhir_server`;
`unavailable()` says why it cannot run, else None."""
from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent / "fhir_server"
SKIP_MESSAGE = "Medplum FHIR server tests NOT RUN: install node and run `npm ci --prefix tests/fhir_server`"
MIN_NODE = (20, 19)
REQUIRE_ALL_ENV = "TOKEN_EXCHANGE_TEST_REQUIRE_ALL"


@functools.cache
def unavailable() -> str | None:
    """None when the Medplum server can run here, else the plain reason (SKIP_MESSAGE ...)."""
    node = shutil.which("node")
    if not node or not (HERE / "node_modules").is_dir():
        return SKIP_MESSAGE
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        version = tuple(int(p) for p in out.lstrip("v").split(".")[:2])
    except ValueError:
        version = (0, 0)
    if version < MIN_NODE:
        return f"{SKIP_MESSAGE} (node {out or '?'} found; Medplum needs >= {'.'.join(map(str, MIN_NODE))})"
    return None


def require_all() -> bool:
    return os.environ.get(REQUIRE_ALL_ENV) == "1"


class JWKSServer:
    """A JWKS endpoint on loopback: serves `self.jwks` (tests set it) at `self.url`."""

    def __init__(self, jwks=None):
        self.jwks = jwks or {"keys": []}
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.hits += 1
                data = json.dumps(server.jwks).encode()
                self.send_response(200 if self.path == "/jwks" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class MedplumFHIRServer:
    """tests/fhir_server/server.js as a subprocess. FHIR R4 under `base`; bearer JWTs from
    `issuer` (verified with the keys at `jwks_url`, `aud` = `base` unless `audience`);
    `seed()`, `requests()`, `reset()` through its admin endpoints."""

    def __init__(self, jwks_url: str, issuer: str, audience: str | None = None, base_path: str = "/fhir",
                 startup_timeout: float = 60.0):
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self.admin_token = secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_SERVER_")}
        env.update(FHIR_SERVER_PORT="0", FHIR_SERVER_JWKS_URL=jwks_url, FHIR_SERVER_ISSUER=issuer,
                   FHIR_SERVER_BASE_PATH=base_path, FHIR_SERVER_ADMIN_TOKEN=self.admin_token)
        if audience:
            env["FHIR_SERVER_AUDIENCE"] = audience
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([shutil.which("node"), str(HERE / "server.js")], cwd=HERE, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr)
        try:
            ready = self._ready_line(startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.port, self.base, self.audience = ready["port"], ready["base"], ready["audience"]
        self.admin = f"http://127.0.0.1:{self.port}/admin"
        self._http = requests.Session()
        self._http.headers["X-Admin-Token"] = self.admin_token

    def _ready_line(self, timeout):
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline, buf = time.monotonic() + timeout, b""
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                raise RuntimeError(f"Medplum FHIR server not ready after {timeout} s: {self.stderr()}")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"Medplum FHIR server exited ({self.proc.wait()}): {self.stderr()}")
            buf += chunk
        sel.close()
        line = json.loads(buf.split(b"\n", 1)[0])
        if not line.get("ready"):
            raise RuntimeError(f"Medplum FHIR server said {line!r}")
        return line

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    def _admin(self, method, path, body=None):
        r = self._http.request(method, self.admin + path, json=body, timeout=30)
        if r.status_code >= 300:
            raise AssertionError(f"admin {method} {path}: {r.status_code} {r.text}")
        return r.json()

    def seed(self, resource_or_bundle: dict) -> dict:
        """Store a resource (its `id` is kept) or each resource of a Bundle; returns them as stored."""
        return self._admin("POST", "/seed", resource_or_bundle)

    def requests(self) -> list[dict]:
        """Every non-admin request served, oldest first: method, path (with query), headers
        (accept, prefer, ...), authorization_scheme, claims and token_header (verified) or
        auth_error, status."""
        return self._admin("GET", "/requests")

    def reset(self):
        """Forget every resource and recorded request."""
        self._admin("POST", "/reset")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._stderr.close()
