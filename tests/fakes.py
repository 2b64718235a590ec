"""The outside world, faked: an EHR authorization server (OIDC discovery, JWKS,
RFC 7662 introspection) on a loopback port, signing tokens with its own key."""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
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


@dataclass
class Scripted:
    """A hostile or odd answer for one FakeEHR endpoint (see FakeEHR.replies)."""
    body: bytes | None = None  # None: the endpoint's normal JSON document
    status: int = 200
    headers: tuple = ()  # extra (name, value) pairs, e.g. Set-Cookie or Location
    trickle: float = 0.0  # seconds between bytes of the body (0: all at once)
    content_length: int | None = None  # declared length; default the body's


def nested_json(depth: int) -> bytes:
    """Valid JSON nested `depth` arrays deep inside an object."""
    return b'{"keys": ' + b"[" * depth + b"]" * depth + b"}"


class FakeEHR:
    """An EHR's authorization server. ``down`` makes every endpoint answer 503;
    ``hang`` makes them sleep (to test timeouts). ``replies`` maps an endpoint
    ("jwks", "introspect", ".well-known/openid-configuration") to a ``Scripted``
    answer (trickled, oversized, nested, with cookies...); ``hits`` counts requests
    per endpoint, ``requests_seen`` keeps (endpoint, headers, form) of each;
    ``reset_hostile()`` clears all three."""

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
        self.backend = BackendServicesEHR(self)  # SMART Backend Services token endpoint and Patient reads
        self.replies = {}
        self.hits = Counter()
        self.requests_seen = []
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
                try:
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (cut off at its deadline)

            def _scripted(self, endpoint, normal):
                """Answer as ehr.replies says for this endpoint; False when it says nothing."""
                reply = ehr.replies.get(endpoint)
                if reply is None:
                    return False
                body = json.dumps(normal).encode() if reply.body is None else reply.body
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if reply.content_length is None
                                                       else reply.content_length))
                for k, v in reply.headers:
                    self.send_header(k, v)
                self.end_headers()
                try:
                    if not reply.trickle:
                        self.wfile.write(body)
                        return True
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(reply.trickle)
                except OSError:
                    pass  # the client gave up
                return True

            def _seen(self, endpoint, form=None):
                ehr.hits[endpoint] += 1
                ehr.requests_seen.append((endpoint, dict(self.headers), form))

            def _gate(self):
                if ehr.hang:
                    time.sleep(ehr.hang)
                if ehr.down:
                    self._send(503, {"error": "down"})
                    return False
                return True

            def do_GET(self):
                if ehr.backend.handle(self, "GET"):
                    return
                path = self.path.split("?")[0]
                endpoint = path[len(name) + 2:] if path.startswith(f"/{name}/") else path
                self._seen(endpoint)
                if path == f"/{name}/jwks":
                    ehr.jwks_hits += 1
                if not self._gate():
                    return
                if path == f"/{name}/.well-known/openid-configuration":
                    if not self._scripted(endpoint, ehr.discovery()):
                        self._send(200, ehr.discovery())
                    return
                if path == f"/{name}/jwks":
                    if not self._scripted(endpoint, ehr.jwks()):
                        self._send(200, ehr.jwks())
                    return
                if not self._scripted(endpoint, {"error": "not found"}):
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                if ehr.backend.handle(self, "POST"):
                    return
                if not self._gate():
                    return
                n = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(n).decode())
                path = self.path.split("?")[0]
                self._seen(path[len(name) + 2:] if path.startswith(f"/{name}/") else path, form)
                if path == f"/{name}/introspect":
                    ehr.introspection_auth.append(self.headers.get("Authorization"))
                    tok = (form.get("token") or [""])[0]
                    answer = ehr.opaque.get(tok, {"active": False})
                    if not self._scripted("introspect", answer):
                        self._send(200, answer)
                    return
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

    def reset_hostile(self):
        self.replies.clear()
        self.hits.clear()
        self.requests_seen.clear()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class BackendServicesEHR:
    """The EHR side of SMART Backend Services, for FakeEHR: a token endpoint
    (`{issuer}/token`, client_credentials with a private_key_jwt assertion checked
    against `client_jwks`, the service's JWKS: kid, RS384/ES384, iss = sub =
    `client_id`, aud = the token endpoint, exp at most 5 minutes ahead, jti once)
    and a FHIR Patient read (`{issuer}/fhir/Patient/{id}`) that needs a token it
    issued (tokens are opaque, or JWTs signed by the EHR for `audience`, e.g. a
    Medplum server playing the EHR's FHIR server). `patients` holds the Patients;
    `token_fault` / `read_fault` make the token endpoint / the read answer that HTTP
    status instead. Records `token_requests` (the assertion's header and claims, or
    the error) and `reads` (path, token accepted)."""

    def __init__(self, ehr):
        self.ehr = ehr
        self.fhir_base = ehr.issuer + "/fhir"
        self.token_endpoint = ehr.issuer + "/token"
        self.client_id = None
        self.client_jwks = None  # a JWKS dict, or a function returning one
        self.lifetime = 300
        self.audience = None  # set: access tokens are JWTs for this audience, else opaque
        self.token_fault = self.read_fault = None
        self.patients = {}
        self.issued = {}  # access token -> exp
        self.jtis = set()
        self.token_requests, self.reads = [], []

    def reset(self):
        self.__init__(self.ehr)

    def handle(self, h, method) -> bool:
        path = h.path.split("?")[0]
        if method == "POST" and path == f"/{self.ehr.name}/token":
            n = int(h.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(h.rfile.read(n).decode()).items()}
            status, body = self._token(form)
        elif method == "GET" and path.startswith(f"/{self.ehr.name}/fhir/Patient/"):
            status, body = self._read(h, path.rsplit("/", 1)[1])
        else:
            return False
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json" if "error" in body else "application/fhir+json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        return True

    def _token(self, form):
        if self.token_fault:
            return self.token_fault, {"error": "temporarily_unavailable"}
        try:
            header, claims = self._check_assertion(form)
        except ValueError as e:
            self.token_requests.append({"error": str(e)})
            return 401, {"error": "invalid_client", "error_description": str(e)}
        self.token_requests.append({"header": header, "claims": claims, "scope": form.get("scope")})
        token = uuid.uuid4().hex
        if self.audience:  # an RFC 9068 JWT for a real resource server (the EHR's FHIR server)
            now = int(time.time())
            token = self.ehr.sign({"iss": self.ehr.issuer, "sub": self.client_id, "client_id": self.client_id,
                                   "aud": self.audience, "scope": form.get("scope"), "iat": now,
                                   "exp": now + self.lifetime, "jti": token}, headers={"typ": "at+jwt"})
        self.issued[token] = time.time() + self.lifetime
        return 200, {"access_token": token, "token_type": "bearer", "expires_in": self.lifetime,
                     "scope": form.get("scope")}

    def _check_assertion(self, form):
        if form.get("grant_type") != "client_credentials":
            raise ValueError("grant_type must be client_credentials")
        if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            raise ValueError("client_assertion_type")
        assertion = form.get("client_assertion") or ""
        header = jwt.get_unverified_header(assertion)
        if header.get("alg") not in ("RS384", "ES384"):
            raise ValueError(f"alg {header.get('alg')} is not RS384 or ES384")
        jwks = self.client_jwks() if callable(self.client_jwks) else self.client_jwks
        keys = [k for k in (jwks or {}).get("keys", []) if k.get("kid") == header.get("kid")]
        if len(keys) != 1:
            raise ValueError("no key with that kid in the client's JWKS")
        key = jwt.PyJWK(keys[0]).key  # the JWK names its signing alg; Backend Services use the key with *384
        try:
            claims = jwt.decode(assertion, key, algorithms=[header["alg"]], audience=self.token_endpoint,
                                issuer=self.client_id, options={"require": ["exp", "jti", "sub", "iss", "aud"]})
        except jwt.PyJWTError as e:
            raise ValueError(f"assertion: {e}") from None
        if claims["sub"] != self.client_id or claims["exp"] > time.time() + 300 or claims["jti"] in self.jtis:
            raise ValueError("sub, exp or jti")
        self.jtis.add(claims["jti"])
        return header, claims

    def _read(self, h, pid):
        if self.read_fault:
            self.reads.append({"path": h.path, "authorized": None})
            return self.read_fault, {"resourceType": "OperationOutcome", "issue": []}
        auth = h.headers.get("Authorization") or ""
        token = auth[7:] if auth.startswith("Bearer ") else None
        ok = token in self.issued and self.issued[token] > time.time()
        self.reads.append({"path": h.path, "authorized": ok})
        if not ok:
            return 401, {"resourceType": "OperationOutcome", "issue": []}
        if pid not in self.patients:
            return 404, {"resourceType": "OperationOutcome", "issue": []}
        return 200, self.patients[pid]


def fhir_unescape_split(token: str) -> tuple:
    """A FHIR token parameter `system|value` (R4 3.1.1.5.7 escapes) -> (system, value)."""
    parts, cur, i = [], "", 0
    while i < len(token):
        c = token[i]
        if c == "\\" and i + 1 < len(token):
            cur += token[i + 1]
            i += 2
            continue
        if c == "|" and not parts:
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


class FakeFHIR:
    """A target FHIR server's Patient search, faked for what a real one may do
    wrong. Searches `patients` by exact system and value (the value FHIR-unescaped).
    `fault`: None, an HTTP status (an OperationOutcome; with 429, `retry_after` as
    Retry-After), "hang" (no answer until `release()`, at most 30 s), "garbage"
    (not JSON), "not-searchset" (a Bundle of another type). `reply(system, value)`,
    when set, gives the Bundle instead. `gate`, a threading.Barrier, holds each
    search until that many have arrived (simultaneous exchanges). Records every
    request in `searches`: path, the identifier's (system, value), headers, token."""

    def __init__(self):
        self.patients = []
        self.fault = None
        self.retry_after = None
        self.reply = None
        self.gate = None
        self.searches = []
        self.arrived = threading.Event()  # set when a search arrives (before any hang)
        self._release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, data: bytes, headers=()):
                self.send_response(code)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:
                    pass

            def do_GET(self):
                from urllib.parse import urlsplit
                parts = urlsplit(self.path)
                q = parse_qs(parts.query)
                ident = (q.get("identifier") or [""])[0]
                auth = self.headers.get("Authorization") or ""
                fake.searches.append({"path": self.path, "identifier": fhir_unescape_split(ident),
                                      "count": (q.get("_count") or [None])[0], "headers": dict(self.headers),
                                      "token": auth[7:] if auth.startswith("Bearer ") else None})
                fake.arrived.set()
                if fake.gate is not None:
                    fake.gate.wait(timeout=30)
                if fake.fault == "hang":
                    fake._release.wait(timeout=30)
                    return
                if isinstance(fake.fault, int):
                    headers = [("Retry-After", fake.retry_after)] if fake.retry_after else []
                    return self._send(fake.fault, json.dumps({"resourceType": "OperationOutcome",
                                                              "issue": []}).encode(), headers)
                if fake.fault == "garbage":
                    return self._send(200, b"<html>not FHIR</html>")
                if parts.path != "/fhir/Patient":
                    return self._send(404, b"{}")
                system, value = fhir_unescape_split(ident)
                if fake.reply is not None:
                    bundle = fake.reply(system, value)
                else:
                    hits = [p for p in fake.patients
                            if any(i.get("system") == system and i.get("value") == value
                                   for i in p.get("identifier", []))]
                    bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(hits),
                              "link": [{"relation": "self", "url": fake.base + self.path[5:]}]}
                    if hits:
                        bundle["entry"] = [{"fullUrl": f"{fake.base}/Patient/{p['id']}", "resource": p,
                                            "search": {"mode": "match"}} for p in hits[:2]]
                    if len(hits) > 2:
                        bundle["link"].append({"relation": "next", "url": fake.base + "/Patient?page=2"})
                if fake.fault == "not-searchset":
                    bundle["type"] = "collection"
                self._send(200, json.dumps(bundle).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, pid, *identifiers, **extra):
        """A Patient with these (system, value) identifiers."""
        self.patients.append({"resourceType": "Patient", "id": pid,
                              "identifier": [{"system": s, "value": v} for s, v in identifiers], **extra})

    def release(self):
        self._release.set()

    def stop(self):
        self.release()
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
