"""The outside world, faked: an EHR authorization server (OIDC discovery, JWKS,
RFC 7662 introspection) on a loopback port, signing tokens with its own key."""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SOURCE = "https://fhir.a.example/fhir"
TARGET = "https://fhir.b.example/fhir"
TARGET2 = "https://fhir.c.example/fhir"
UPSTREAM = "vendor-at-ehr"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_key(alg="RS256"):
    if alg.startswith("ES"):
        return ec.generate_private_key({"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1()}[alg])
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class FakeEHR:
    """An EHR's authorization server. ``down`` makes every endpoint answer 503;
    ``hang`` makes them sleep (to test timeouts)."""

    def __init__(self, name="ehr-a", alg="RS256"):
        self.port = free_port()
        self.name = name
        self.issuer = f"http://127.0.0.1:{self.port}/{name}"
        self.alg = alg
        self.key = new_key(alg)
        self.kid = f"{name}-k1"
        self.extra_keys = []  # (kid, key) published too
        self.opaque = {}  # opaque token -> introspection response
        self.introspection_auth = []  # Authorization headers seen
        self.jwks_hits = 0
        self.down = False
        self.hang = 0.0
        ehr = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _gate(self):
                if ehr.hang:
                    time.sleep(ehr.hang)
                if ehr.down:
                    self._send(503, {"error": "down"})
                    return False
                return True

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == f"/{name}/jwks":
                    ehr.jwks_hits += 1
                if not self._gate():
                    return
                if path == f"/{name}/.well-known/openid-configuration":
                    return self._send(200, ehr.discovery())
                if path == f"/{name}/jwks":
                    return self._send(200, ehr.jwks())
                self._send(404, {"error": "not found"})

            def do_POST(self):
                if not self._gate():
                    return
                n = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(n).decode())
                if self.path.split("?")[0] == f"/{name}/introspect":
                    ehr.introspection_auth.append(self.headers.get("Authorization"))
                    tok = (form.get("token") or [""])[0]
                    return self._send(200, ehr.opaque.get(tok, {"active": False}))
                self._send(404, {"error": "not found"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def discovery(self):
        return {"issuer": self.issuer, "jwks_uri": self.issuer + "/jwks",
                "token_endpoint": self.issuer + "/token",
                "introspection_endpoint": self.issuer + "/introspect",
                "id_token_signing_alg_values_supported": [self.alg]}

    def public_jwk(self, key, kid, alg=None):
        alg = alg or self.alg
        jwk = json.loads(jwt.get_algorithm_by_name(alg).to_jwk(key.public_key()))
        jwk.update(kid=kid, use="sig", alg=alg)
        return jwk

    def jwks(self):
        return {"keys": [self.public_jwk(self.key, self.kid)] +
                [self.public_jwk(k, kid, a) for kid, k, a in self.extra_keys]}

    def sign(self, claims, key=None, alg=None, headers=None):
        h = {"kid": self.kid}
        h.update(headers or {})
        return jwt.encode(claims, key or self.key, algorithm=alg or self.alg, headers=h)

    def access_claims(self, sub="user-1", scope="patient/*.rs user/*.rs openid fhirUser",
                      client=UPSTREAM, ttl=600, **extra):
        now = int(time.time())
        c = {"iss": self.issuer, "sub": sub, "aud": SOURCE, "client_id": client, "scope": scope,
             "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex}
        c.update(extra)
        return {k: v for k, v in c.items() if v is not None}

    def access_token(self, **kw):
        return self.sign(self.access_claims(**kw))

    def id_claims(self, sub="user-1", patient="a-123", source=SOURCE, client=UPSTREAM, ttl=600, **extra):
        now = int(time.time())
        c = {"iss": self.issuer, "sub": sub, "aud": client, "azp": client, "iat": now, "exp": now + ttl,
             "fhirUser": SOURCE + "/Practitioner/p1", "patient": patient, "source": source}
        c.update(extra)
        return {k: v for k, v in c.items() if v is not None}

    def id_token(self, **kw):
        return self.sign(self.id_claims(**kw))

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class TCPProxy:
    """A loopback TCP forwarder that can be cut and restored: a database that goes away."""

    def __init__(self, upstream_port, upstream_host="127.0.0.1"):
        self.port = free_port()
        self.upstream = (upstream_host, upstream_port)
        self.conns = []
        self.listener = None
        self.up()

    def up(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns = []

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
