"""The service's world: a fresh database (SQLite, or PostgreSQL + Redis: bench/backends.py) set
up only through the `token-exchange` CLI (issuer, targets, client, trusts, links, and the
variants' extras), the environments the service and the floor app run with, and the fake FHIR
target the match variant searches."""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from fakes import FakeEHR, free_port

from bench.common import (BIN, CLIENT_ID, CLIENT_SECRET, MATCH_SYSTEM, SOURCE, TARGET, TARGET_CONSENT,
                          TARGET_USER_ASIS, TARGET_USER_MAPPED, UPSTREAM, USER_SYSTEM, USERS, log)
from bench.workload import patient_id


class FakeFHIR:
    """A target FHIR server as far as matching needs one: GET /fhir/Patient?identifier=
    SYSTEM|VALUE answers a searchset Bundle with exactly one matching Patient (id
    m-VALUE); under ``user_base`` (/fhir-u), GET /fhir-u/Practitioner?identifier=...
    one matching Practitioner, for user matching. It does not check the search token: what is measured is the service's
    side of a first-time match. (Not tests/fakes.py's FakeFHIR, which records every
    request and closes every connection: this one keeps them alive, as a real server does.)"""

    def __init__(self):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.user_base = f"http://127.0.0.1:{self.port}/fhir-u"
        self.searches = self.user_searches = 0
        fhir = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real FHIR server offers
            disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *a):
                pass

            def do_GET(self):
                path, _, query = self.path.partition("?")
                ident = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("identifier", "")
                system, _, value = urllib.parse.unquote(ident).partition("|")
                kind = {"/fhir/Patient": "Patient", "/fhir-u/Practitioner": "Practitioner"}.get(path)
                if kind is None or not value:
                    self.send_error(404)
                    return
                if kind == "Patient":
                    fhir.searches += 1
                else:
                    fhir.user_searches += 1
                body = json.dumps({"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": [{
                    "fullUrl": f"{path}/m-{value}", "search": {"mode": "match"},
                    "resource": {"resourceType": kind, "id": f"m-{value}", "active": True,
                                 "identifier": [{"system": system, "value": value}]}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class World:
    """The service's database (on `backend`, SQLite in `tmp` by default) and the environments
    of the service (and its es256 copy) and the floor app, each with its own loopback port."""

    def __init__(self, tmp: Path, ehr: FakeEHR, fhir: FakeFHIR | None = None, backend=None):
        from bench.backends import SQLite
        self.tmp, self.ehr, self.fhir = tmp, ehr, fhir
        self.backend = backend or SQLite(tmp)
        self.auth = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        self.svc_port, self.floor_port = free_port(), free_port()
        self.db_url = self.backend.url()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKEN_EXCHANGE_", "FLOOR_"))}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        self.svc_env = dict(env, TOKEN_EXCHANGE_DATABASE_URL=self.db_url,
                            TOKEN_EXCHANGE_ISSUER=f"http://127.0.0.1:{self.svc_port}",
                            BENCH_VENDOR_SECRET=CLIENT_SECRET, **self.backend.env())
        self.es_url = None  # variant es256: a copy of the set-up database whose active key is ES256
        self.es_env = dict(self.svc_env)
        pem = tmp / "ehr-public.pem"
        pem.write_bytes(ehr.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
        self.floor_env = dict(env, FLOOR_EHR_PEM=str(pem))

    def cli(self, *argv, timeout=900, env=None) -> str:
        """Run `token-exchange ARGV`; note its wall time and peak RSS (VmHWM, sampled)."""
        cmd = [str(BIN / "token-exchange"), *argv]
        t = time.perf_counter()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, cwd=self.tmp, env=env or self.svc_env, stdout=out, stderr=err, text=True)
            peak = 0
            while proc.poll() is None:
                try:
                    m = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{proc.pid}/status").read_text(), re.M)
                    peak = max(peak, int(m.group(1))) if m else peak
                except OSError:
                    pass
                if time.perf_counter() - t > timeout:
                    proc.kill()
                time.sleep(0.05)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if proc.returncode != 0:
            raise SystemExit(f"CLI failed: token-exchange {shlex.join(argv)}\n{stdout}\n{stderr}")
        self.last_cli_s = time.perf_counter() - t
        self.last_cli_peak_mib = peak / 1024
        return stdout.strip()

    def setup_world(self, links: int):
        self.cli("db", "upgrade")
        self.cli("issuer", "add", self.ehr.issuer, "--jwks-uri", self.ehr.issuer + "/jwks", "--source", SOURCE,
                 "--algs", "RS256")
        self.cli("target", "add", TARGET, "--name", "hospital-b")
        self.cli("client", "add", CLIENT_ID, "--secret-env", "BENCH_VENDOR_SECRET")
        self.cli("trust", "add", "--client", CLIENT_ID, "--issuer", self.ehr.issuer, "--target", TARGET,
                 "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
        return self.import_links(0, links)

    def setup_variants(self, links: int, variants) -> list[dict]:
        """What the variants need, through the CLI (and the consents users would have
        given in their browsers, which no command can give on their behalf)."""
        imports = []
        trust = ["trust", "add", "--client", CLIENT_ID, "--issuer", self.ehr.issuer, "--scopes", "patient/*.rs",
                 "--upstream-client-id", UPSTREAM]
        if "consent" in variants:
            self.cli("target", "add", TARGET_CONSENT, "--name", "hospital-c")
            self.cli(*trust, "--target", TARGET_CONSENT, "--consent", "required", "--consent-max-days", "365")
            imports.append(self.import_links(0, links, TARGET_CONSENT))
            self.write_consents(links)
        if "match" in variants:
            self.cli("issuer", "update", self.ehr.issuer, "--identifier-system", MATCH_SYSTEM)
            self.cli("target", "add", self.fhir.base, "--name", "hospital-m", "--match-identifier", MATCH_SYSTEM)
            self.cli(*trust, "--target", self.fhir.base)
        user_trust = [*trust[:-4], "--scopes", "patient/*.rs user/*.rs", "--upstream-client-id", UPSTREAM]
        if "user-as-is" in variants:
            self.cli("target", "add", TARGET_USER_ASIS, "--name", "hospital-d")
            self.cli(*user_trust, "--target", TARGET_USER_ASIS)
            imports.append(self.import_links(0, links, TARGET_USER_ASIS))
        if "user-mapped" in variants:
            self.cli("target", "add", TARGET_USER_MAPPED, "--name", "hospital-e", "--users", "mapped")
            self.cli(*user_trust, "--target", TARGET_USER_MAPPED)
            imports.append(self.import_links(0, links, TARGET_USER_MAPPED))
            path = self.tmp / "user-links.csv"
            path.write_text("user,target,target_user\n" + "".join(
                f"{SOURCE}/Practitioner/pr-{k},{TARGET_USER_MAPPED},Practitioner/e-{k}\n" for k in range(USERS)))
            log(f"  token-exchange user-link import: {self.cli('user-link', 'import', str(path))!r}")
        if "user-match" in variants:
            self.cli("issuer", "update", self.ehr.issuer, "--user-identifier-system", USER_SYSTEM)
            self.cli("target", "add", self.fhir.user_base, "--name", "hospital-u", "--users", "mapped",
                     "--user-match-identifier", USER_SYSTEM)
            self.cli(*user_trust, "--target", self.fhir.user_base)
        if "es256" in variants:
            # The same world in a second database, whose active signing key is ES256.
            self.es_url = self.backend.copy("es256")
            self.es_env["TOKEN_EXCHANGE_DATABASE_URL"] = self.es_url
            self.cli("keys", "stage", "--alg", "ES256", env=self.es_env)
            self.cli("keys", "rotate", env=self.es_env)
        return imports

    def write_consents(self, n: int):
        """User consent-user-K consented for patient K (0 <= K < n) to the vendor reaching
        hospital-c with patient/*.rs for a year, as the approval page records it."""
        from datetime import timedelta

        from sqlalchemy import insert, select

        from token_exchange.db import make_engine
        from token_exchange.models import Consent, Target
        engine = make_engine(self.db_url)
        now = datetime.now(timezone.utc)
        with engine.begin() as conn:
            target_id = conn.execute(select(Target.id).where(Target.base_url == TARGET_CONSENT)).scalar_one()
            conn.execute(insert(Consent), [{
                "id": uuid.uuid4().hex, "issuer": self.ehr.issuer, "sub": f"consent-user-{k}", "signer": None,
                "source": SOURCE, "patient": patient_id(k), "client_id": CLIENT_ID, "target_id": target_id,
                "scopes": "patient/*.rs", "granted": now, "expires": now + timedelta(days=365),
                "decision": "granted"} for k in range(n)])
        engine.dispose()
        log(f"  {n:,} consents recorded (consent-user-K for patient K, patient/*.rs, 365 days)")

    def import_links(self, first: int, stop: int, target: str = TARGET) -> dict:
        path = self.tmp / f"links-{first}-{stop}.csv"
        with path.open("w") as f:
            f.write("source,patient,target,target_patient\n")
            for n in range(first, stop):
                f.write(f"{SOURCE},{patient_id(n)},{target},b-{n:07d}\n")
        out = self.cli("link", "import", str(path))
        took, peak = self.last_cli_s, self.last_cli_peak_mib
        path.unlink()
        log(f"  token-exchange link import: {out!r} in {took:.1f} s, peak RSS {peak:.0f} MiB")
        return {"rows": stop - first, "seconds": took, "output": out, "peak_rss_mib": peak, "target": target}

    def audit_counts(self) -> dict:
        """Audit outcomes over both databases; links and matches per target in the main one."""
        from sqlalchemy import text

        from token_exchange.db import make_engine
        audit: dict = {}
        for url in (self.db_url, self.es_url):
            if url is None:
                continue
            engine = make_engine(url)
            try:
                with engine.connect() as con:
                    for outcome, n in con.execute(text("SELECT outcome, count(*) FROM audit_event GROUP BY outcome")):
                        audit[outcome] = audit.get(outcome, 0) + n
                    if url == self.db_url:
                        links = dict(con.execute(text(
                            "SELECT t.base_url || ' ' || l.origin, count(*) FROM patient_link l "
                            "JOIN target t ON t.id = l.target_id GROUP BY t.base_url, l.origin")).fetchall())
                        links.update(con.execute(text(
                            "SELECT 'users ' || t.base_url || ' ' || l.origin, count(*) FROM user_link l "
                            "JOIN target t ON t.id = l.target_id GROUP BY t.base_url, l.origin")).fetchall())
            finally:
                engine.dispose()
        return {"audit": audit, "links": links}
