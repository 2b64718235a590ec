#!/usr/bin/env python3
"""The token-exchange benchmark: one command, `python bench/run.py [--quick]`.

What it does (see bench/README.md):

1. A fresh SQLite database in a temp dir, set up only through the
   `token-exchange` CLI: a fake EHR issuer (an RSA key whose JWKS this process
   serves on loopback), a target, client `vendor`, a trust, and 1,000 patient
   links (`link import` of a generated CSV).
2. Distinct RS256-signed (access token, ID token) pairs, more than a run can
   send, in one file per round plus a separate warm-up file, so no cache of
   verified tokens can help. Many patients, all linked.
3. Alternating runs of the floor app (bench/floor_app.py) and the
   service, each under `gunicorn -w 2`, driven with wrk at 16 connections after
   a short warm-up: exchanges/s, p50/p99 latency, non-2xx count, peak RSS per
   worker. The headline is service / floor; both are also set against the
   crypto-only ceiling = cores / (2 RS256 verify + 1 RS256 sign), measured here.
4. Variants, in the same rounds as step 3 and against the same floor: the service
   signing with an ES256 key, exchanges under a user's existing consent, and
   exchanges that each match a new patient at a target (`--variants`).
5. The service again at 1,000,000 links (100,000 with --quick).
6. bench/RESULTS.md (--quick: bench/out/RESULTS-quick.md) and raw JSON in bench/out/.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
if Path(sys.prefix).resolve() != VENV.resolve() and (VENV / "bin" / "python").exists():
    # Run under the service's own interpreter and libraries (the ones we report).
    os.execv(str(VENV / "bin" / "python"), [str(VENV / "bin" / "python"), *sys.argv])

import argparse  # noqa: E402
import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from importlib import metadata  # noqa: E402
from urllib.parse import urlencode  # noqa: E402

import jwt  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: E402

BENCH = ROOT / "bench"
OUT = BENCH / "out"
LUA = BENCH / "token.lua"
BIN = VENV / "bin"
FLOOR_DIR = Path(__file__).resolve().parent  # bench/floor_app.py: a byte-identical copy of the shared floor app

TE = "urn:ietf:params:oauth:grant-type:token-exchange"
AT = "urn:ietf:params:oauth:token-type:access_token"
IDT = "urn:ietf:params:oauth:token-type:id_token"
SOURCE = "https://fhir.a.example/fhir"
TARGET = "https://fhir.b.example/fhir"
UPSTREAM = "vendor-at-ehr"
EHR_SCOPE = "patient/*.rs user/*.rs openid fhirUser"
REQ_SCOPE = "patient/Observation.rs"
CLIENT_ID = "vendor"
CLIENT_SECRET = "bench-vendor-secret-0123456789abcdef-0123456789"  # >= 32 characters
TOKEN_TTL = 4 * 3600  # EHR tokens outlive the whole benchmark
TARGET_CONSENT = "https://fhir.c.example/fhir"  # variant "consent": its trust requires the user's consent
MATCH_SYSTEM = "urn:oid:2.16.840.1.113883.4.1"  # variant "match": the identifier system both sides trust
VARIANTS = {  # --variants: service runs added to every round of the 1,000-link phase, after the RS256 run
    "es256": "the same exchanges, the service signing with an ES256 (P-256) key instead of RS256",
    "consent": "a trust that requires consent, every user having consented already (one indexed read more "
               "per exchange, and an entry in the audit's partial index of tokens minted under a consent)",
    "match": "every exchange for a patient with no link yet: the service mints itself a search token, "
             "searches the target by identifier (a fake FHIR server on loopback), stores the matched link",
}

# Set in the parent before forking the signing pool; read by _sign_chunk.
_EHR_KEY = None
_EHR_ISS = None
_EHR_KID = None
_MATCH_TARGET = None


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the fake EHR ---------------------------------------------------------------
class FakeEHR:
    """An EHR authorization server as far as the service needs one: an RSA key and
    its JWKS at http://127.0.0.1:PORT/jwks (a threaded http.server on loopback)."""

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "bench-ehr-k1"
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.jwks_uri = self.issuer + "/jwks"
        self.jwks_hits = 0
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, alg="RS256", use="sig")
        body = json.dumps({"keys": [jwk]}).encode()
        ehr = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path.split("?")[0] == "/jwks":
                    ehr.jwks_hits += 1
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def write_public_pem(self, path: Path) -> Path:
        path.write_bytes(self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return path

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeFHIR:
    """A target FHIR server as far as matching needs one: GET /fhir/Patient?identifier=
    SYSTEM|VALUE answers a searchset Bundle with exactly one matching Patient (id
    m-VALUE). It does not check the search token: what is measured is the service's
    side of a first-time match."""

    def __init__(self):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.searches = 0
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
                if path != "/fhir/Patient" or not value:
                    self.send_error(404)
                    return
                fhir.searches += 1
                body = json.dumps({"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": [{
                    "fullUrl": f"{fhir.base}/Patient/m-{value}", "search": {"mode": "match"},
                    "resource": {"resourceType": "Patient", "id": f"m-{value}", "active": True,
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


# -- request bodies -------------------------------------------------------------
def patient_id(n: int) -> str:
    return f"a-{n:07d}"


def _sign_chunk(task):
    """(tag, first index, patient numbers, kind) -> form bodies, one pair of tokens each.
    kind: "std" (linked patients), "consent" (each patient's consenting user) or
    "match" (patients with no link, carrying an identifier the target is searched by)."""
    tag, first, patients, kind = task
    now = int(time.time())
    out = []
    for i, pn in enumerate(patients, start=first):
        sub = f"user-{tag}-{i}"  # distinct per pair: no two ID tokens alike either
        ident = {"iss": _EHR_ISS, "aud": UPSTREAM, "azp": UPSTREAM, "iat": now,
                 "exp": now + TOKEN_TTL, "fhirUser": f"{SOURCE}/Practitioner/pr-{i % 997}",
                 "patient": patient_id(pn), "source": SOURCE}
        resource = TARGET
        if kind == "consent":
            sub = f"consent-user-{pn}"  # the user who consented for this patient
            ident["nonce"] = uuid.uuid4().hex  # keeps this user's ID tokens distinct
            resource = TARGET_CONSENT
        elif kind == "match":
            ident["patient"] = f"m-{pn:09d}"  # never linked, never matched before
            ident["patient_identifier"] = [f"{MATCH_SYSTEM}|{pn:09d}"]
            resource = _MATCH_TARGET
        ident["sub"] = sub
        access = {"iss": _EHR_ISS, "sub": sub, "aud": SOURCE, "client_id": UPSTREAM, "scope": EHR_SCOPE,
                  "iat": now, "exp": now + TOKEN_TTL, "jti": uuid.uuid4().hex}
        h = {"kid": _EHR_KID}
        out.append(urlencode([
            ("grant_type", TE),
            ("subject_token", jwt.encode(access, _EHR_KEY, algorithm="RS256", headers=h)),
            ("subject_token_type", AT),
            ("actor_token", jwt.encode(ident, _EHR_KEY, algorithm="RS256", headers=h)),
            ("actor_token_type", IDT),
            ("resource", resource),
            ("scope", REQ_SCOPE),
        ]))
    return out


def make_bodies(ehr: FakeEHR, sets: list[tuple], tmp: Path, match_target: str | None = None) -> dict[str, Path]:
    """sets: (tag, count, patients, kind) -> {tag: file of form bodies, one per line}.
    patients is a number N (each pair's patient drawn at random from the first N) or a
    range (used in order, each once). Signed in a pool of processes, one per core
    (before any run, so it disturbs none)."""
    global _EHR_KEY, _EHR_ISS, _EHR_KID, _MATCH_TARGET
    _EHR_KEY, _EHR_ISS, _EHR_KID, _MATCH_TARGET = ehr.key, ehr.issuer, ehr.kid, match_target
    files = {}
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(os.cpu_count() or 1) as pool:
        for tag, count, prange, kind in sets:
            if isinstance(prange, range):
                patients = list(prange)[:count]
                drawn = f"patients {prange.start:,}..{prange.start + count - 1:,}, none linked"
            else:
                rng = random.Random(f"bench-{tag}")
                patients = [rng.randrange(prange) for _ in range(count)]
                drawn = f"patients drawn from {prange:,} linked"
            chunk = 250
            tasks = [(tag, s, patients[s:s + chunk], kind) for s in range(0, count, chunk)]
            path = tmp / f"bodies-{tag}.txt"
            started = time.perf_counter()
            with path.open("w") as f:
                for bodies in pool.imap(_sign_chunk, tasks):
                    f.write("\n".join(bodies) + "\n")
            files[tag] = path
            log(f"  {count} token pairs for '{tag}' ({drawn}) in {time.perf_counter() - started:.1f} s")
    return files


# -- crypto-only ceiling ---------------------------------------------------------
def _best_per_op(fn, n, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def measure_crypto(ehr: FakeEHR) -> dict:
    """RS256 verify and sign, in this process, single-threaded: with PyJWT exactly as
    the floor app calls it (the ceiling uses these), and raw cryptography for reference."""
    now = int(time.time())
    token = jwt.encode({"iss": ehr.issuer, "sub": "user-1", "aud": SOURCE, "client_id": UPSTREAM,
                        "scope": EHR_SCOPE, "iat": now, "exp": now + 3600, "jti": uuid.uuid4().hex},
                       ehr.key, algorithm="RS256", headers={"kid": ehr.kid})
    pub = ehr.key.public_key()
    sign_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    minted = {"iss": "http://127.0.0.1:8000", "aud": TARGET, "sub": "user-1", "client_id": CLIENT_ID,
              "scope": REQ_SCOPE, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex,
              "patient": "b-0000001", "act": {"sub": CLIENT_ID}}
    msg = token.rsplit(".", 1)[0].encode()
    sig = ehr.key.sign(msg, padding.PKCS1v15(), hashes.SHA256())
    res = {
        "pyjwt_verify_s": _best_per_op(lambda: jwt.decode(token, pub, algorithms=["RS256"], audience=SOURCE), 400),
        "pyjwt_sign_s": _best_per_op(lambda: jwt.encode(minted, sign_key, algorithm="RS256",
                                                         headers={"kid": "k1", "typ": "at+jwt"}), 100),
        "raw_verify_s": _best_per_op(lambda: pub.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256()), 400),
        "raw_sign_s": _best_per_op(lambda: sign_key.sign(msg, padding.PKCS1v15(), hashes.SHA256()), 100),
        "pyjwt_es256_sign_s": _best_per_op(lambda: jwt.encode(minted, ec_key, algorithm="ES256",
                                                               headers={"kid": "k2", "typ": "at+jwt"}), 400),
    }
    res["cores"] = os.cpu_count() or 1
    res["per_exchange_s"] = 2 * res["pyjwt_verify_s"] + res["pyjwt_sign_s"]
    res["ceiling_per_s"] = res["cores"] / res["per_exchange_s"]
    return res


# -- processes -------------------------------------------------------------------
class Gunicorn:
    """One `gunicorn -w 2 APP` started by this script; stopped by its own pid."""

    def __init__(self, name, app, port, cwd, env, log_path, workers=2, chdir=None):
        self.name, self.port, self.cwd, self.env = name, port, cwd, env
        self.base = f"http://127.0.0.1:{port}"
        self.argv = [str(BIN / "gunicorn"), "-w", str(workers), "-b", f"127.0.0.1:{port}"]
        if chdir:
            self.argv += ["--chdir", str(chdir)]
        self.argv.append(app)
        self.log_path = log_path
        self.proc = None

    def start(self, wait=60):
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + wait
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited at start; log:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=1) as r:
                    if r.status == 200 and len(self.workers()) >= 2:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{self.name} did not answer /healthz in {wait} s; log:\n{self.log_tail()}")

    def workers(self) -> list[int]:
        """The gunicorn workers: the master's children."""
        pids = []
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        return sorted(set(pids))

    def peak_rss_kib(self) -> dict[int, int]:
        """VmHWM (peak resident set) of each worker, KiB."""
        out = {}
        for pid in self.workers():
            try:
                m = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
            except OSError:
                continue
            if m:
                out[pid] = int(m.group(1))
        return out

    def log_tail(self, n=3000) -> str:
        try:
            if not self.log.closed:
                self.log.flush()
            return Path(self.log_path).read_text()[-n:]
        except OSError:
            return ""

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)  # gunicorn stops its workers gracefully
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session this script created
            self.proc.wait(10)
        self.log.close()


def post_token(base: str, body: str, auth: str) -> tuple[int, str]:
    req = urllib.request.Request(base + "/token", data=body.encode(), method="POST", headers={
        "Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


HZ = os.sysconf("SC_CLK_TCK")
OTHER_MAX = 0.2  # cores other processes may use during a run before it is done again


def busy_seconds() -> float:
    """CPU time spent on all cores (user, nice, system, irq, softirq, steal), from /proc/stat."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / HZ


def proc_cpu_seconds(pids) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / HZ


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def other_load(seconds: float) -> float:
    """Cores busy with work that is not this script's, over a sample of `seconds`."""
    b0, o0 = busy_seconds(), time.process_time()
    time.sleep(seconds)
    return max(0.0, (busy_seconds() - b0) - (time.process_time() - o0)) / seconds


def wait_quiet(max_wait: float, threshold: float = OTHER_MAX) -> float:
    """Wait (at most max_wait s) until other processes use under `threshold` cores."""
    deadline = time.time() + max_wait
    load = other_load(1.0)
    said = False
    while load > threshold and time.time() < deadline:
        if not said:
            log(f"  other processes use {load:.2f} cores; waiting up to {max_wait:.0f} s for a quiet machine")
            said = True
        load = other_load(2.0)
    return load


def run_wrk(url, bodies: Path, seconds: float, threads: int, connections: int, auth: str,
            dump_prefix: str) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(LUA), url,
           "--", str(bodies), str(threads), auth, dump_prefix]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    m = re.search(r"^BENCH_JSON (\{.*\})$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise SystemExit(f"wrk failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    res = json.loads(m.group(1))
    w = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", r.stdout)
    res["wrk_non2xx_or_3xx"] = int(w.group(1)) if w else 0
    res["wrk_stdout"] = r.stdout
    res["cmd"] = cmd
    return res


# -- one measured run -----------------------------------------------------------
class Bench:
    def __init__(self, args, tmp: Path, ehr: FakeEHR, fhir: FakeFHIR | None = None):
        self.args, self.tmp, self.ehr, self.fhir = args, tmp, ehr, fhir
        self.auth = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        self.svc_port, self.floor_port = free_port(), free_port()
        self.db = tmp / "te.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKEN_EXCHANGE_", "FLOOR_"))}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        self.svc_env = dict(env, TOKEN_EXCHANGE_DATABASE_URL=f"sqlite:///{self.db}",
                            TOKEN_EXCHANGE_ISSUER=f"http://127.0.0.1:{self.svc_port}",
                            BENCH_VENDOR_SECRET=CLIENT_SECRET)
        self.es_db = tmp / "te-es256.db"  # variant es256: a copy of the set-up database whose active key is ES256
        self.es_env = dict(self.svc_env, TOKEN_EXCHANGE_DATABASE_URL=f"sqlite:///{self.es_db}")
        self.floor_env = dict(env, FLOOR_EHR_PEM=str(ehr.write_public_pem(tmp / "ehr-public.pem")))
        self.runs: list[dict] = []
        self.discarded: list[dict] = []  # runs done again because other processes disturbed them
        self.problems: list[str] = []
        self.service_2xx_seen = 0  # every 2xx the service answered that this script saw
        self.service_non2xx_seen = 0

    # the CLI ------------------------------------------------------------------
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
        self.cli("issuer", "add", self.ehr.issuer, "--jwks-uri", self.ehr.jwks_uri, "--source", SOURCE,
                 "--algs", "RS256")
        self.cli("target", "add", TARGET, "--name", "hospital-b")
        self.cli("client", "add", CLIENT_ID, "--secret-env", "BENCH_VENDOR_SECRET")
        self.cli("trust", "add", "--client", CLIENT_ID, "--issuer", self.ehr.issuer, "--target", TARGET,
                 "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
        return self.import_links(0, links)

    def setup_variants(self, links: int) -> list[dict]:
        """What the variants need, through the CLI (and the consents users would have
        given in their browsers, which no command can give on their behalf)."""
        imports = []
        trust = ["trust", "add", "--client", CLIENT_ID, "--issuer", self.ehr.issuer, "--scopes", "patient/*.rs",
                 "--upstream-client-id", UPSTREAM]
        if "consent" in self.args.variants:
            self.cli("target", "add", TARGET_CONSENT, "--name", "hospital-c")
            self.cli(*trust, "--target", TARGET_CONSENT, "--consent", "required", "--consent-max-days", "365")
            imports.append(self.import_links(0, links, TARGET_CONSENT))
            self.write_consents(links)
        if "match" in self.args.variants:
            self.cli("issuer", "update", self.ehr.issuer, "--identifier-system", MATCH_SYSTEM)
            self.cli("target", "add", self.fhir.base, "--name", "hospital-m", "--match-identifier", MATCH_SYSTEM)
            self.cli(*trust, "--target", self.fhir.base)
        if "es256" in self.args.variants:
            # The same world in a second database file, whose active signing key is ES256.
            src, dst = sqlite3.connect(self.db), sqlite3.connect(self.es_db)
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()
            self.cli("keys", "stage", "--alg", "ES256", env=self.es_env)
            self.cli("keys", "rotate", env=self.es_env)
        return imports

    def write_consents(self, n: int):
        """User consent-user-K consented for patient K (0 <= K < n) to the vendor reaching
        hospital-c with patient/*.rs for a year, as the approval page records it."""
        from datetime import timedelta

        from sqlalchemy import create_engine, insert, select

        from token_exchange.models import Consent, Target
        engine = create_engine(f"sqlite:///{self.db}")
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

    # one run -------------------------------------------------------------------
    def server(self, kind: str) -> Gunicorn:
        if kind == "service-es256":
            return Gunicorn(kind, "wsgi:app", self.svc_port, ROOT, self.es_env, self.tmp / "service.log")
        if kind.startswith("service"):
            return Gunicorn(kind, "wsgi:app", self.svc_port, ROOT, self.svc_env, self.tmp / "service.log")
        return Gunicorn("floor", "floor_app:app", self.floor_port, FLOOR_DIR, self.floor_env,
                        self.tmp / "floor.log", chdir=FLOOR_DIR)

    def measure(self, kind: str, phase: str, links: int, rnd: int, bodies: Path, warm: Path) -> dict:
        a = self.args
        other_before = wait_quiet(a.quiet_wait)
        service = kind.startswith("service")
        code = code_fingerprint() if service else None
        srv = self.server(kind).start()
        load_before = os.getloadavg()[0]
        try:
            # One exchange by hand first: a broken setup fails here, clearly.
            first = warm.open().readline().strip()
            status, text = post_token(srv.base, first, self.auth)
            if status != 200:
                raise SystemExit(f"{kind}: the first exchange failed: HTTP {status} {text[:500]}\n{srv.log_tail()}")
            if service:
                self.service_2xx_seen += 1
            dump = str(self.tmp / f"fail-{phase}-{kind}-{rnd}")
            warmup = run_wrk(srv.base + "/token", warm, a.warmup, a.threads, a.connections, self.auth,
                             dump + "-warmup")
            gpids = [srv.proc.pid, *srv.workers()]
            cpu0 = (busy_seconds(), proc_cpu_seconds(gpids), children_cpu_seconds(), time.process_time())
            res = run_wrk(srv.base + "/token", bodies, a.duration, a.threads, a.connections, self.auth, dump)
            cpu1 = (busy_seconds(), proc_cpu_seconds(gpids), children_cpu_seconds(), time.process_time())
            rss = srv.peak_rss_kib()
        finally:
            srv.stop()
        secs = res["duration_us"] / 1e6
        ok = res["responses"] - res["non2xx"]
        busy, app_cpu, wrk_cpu, own = (b - a_ for a_, b in zip(cpu0, cpu1))
        cpu = {"app": app_cpu / secs, "wrk": wrk_cpu / secs,
               "other": max(0.0, busy - app_cpu - wrk_cpu - own) / secs,
               "idle": max(0.0, (os.cpu_count() or 1) - busy / secs)}
        run = {
            "phase": phase, "links": links, "round": rnd, "app": kind,
            "requests": res["requests"], "ok": ok, "non2xx": res["non2xx"],
            "wrk_non2xx_or_3xx": res["wrk_non2xx_or_3xx"],
            "socket_errors": sum(res[k] for k in ("err_connect", "err_read", "err_write", "err_timeout")),
            "wrapped": res["wrapped"], "bodies": res["bodies"], "seconds": secs,
            "exchanges_per_s": ok / secs, "requests_per_s": res["requests"] / secs,
            "p50_ms": res["lat_p50_us"] / 1000, "p90_ms": res["lat_p90_us"] / 1000,
            "p99_ms": res["lat_p99_us"] / 1000, "max_ms": res["lat_max_us"] / 1000,
            "rss_peak_mib": sorted(round(v / 1024, 1) for v in rss.values()),
            "loadavg_before": load_before, "other_cores_before": other_before, "cpu_cores": cpu,
            "app_cpu_ms_per_exchange": (app_cpu / ok * 1000) if ok else None,
            "code": code if code == code_fingerprint() else f"{code}..{code_fingerprint()}",
            "warmup": {k: warmup[k] for k in ("responses", "non2xx", "wrapped")},
            "wrk_stdout": res["wrk_stdout"],
        }
        if service:
            self.service_2xx_seen += ok + warmup["responses"] - warmup["non2xx"]
            self.service_non2xx_seen += res["non2xx"] + warmup["non2xx"]
        self.runs.append(run)
        log(f"  {kind:7s} {phase} r{rnd}: {run['exchanges_per_s']:7.1f} exchanges/s  p50 {run['p50_ms']:6.2f} ms  "
            f"p99 {run['p99_ms']:6.2f} ms  non-2xx {run['non2xx']}  sock-err {run['socket_errors']}  "
            f"RSS {run['rss_peak_mib']} MiB  CPU app {cpu['app']:.2f} wrk {cpu['wrk']:.2f} "
            f"other {cpu['other']:.2f} idle {cpu['idle']:.2f} cores")
        if run["wrapped"]:
            self.problems.append(f"{kind} {phase} round {rnd}: the body file ran out ({run['bodies']} bodies); "
                                 "tokens were re-sent. Raise the body count.")
        for label, n in (("measured", res["non2xx"]), ("warm-up", warmup["non2xx"])):
            if n:
                suffix = "" if label == "measured" else "-warmup"
                dumps = sorted(self.tmp.glob(Path(dump + suffix).name + "-*.txt"))
                sample = dumps[0].read_text()[:800] if dumps else "(no response captured)"
                msg = (f"{kind} {phase} round {rnd}: {n} non-2xx responses in the {label} run; "
                       f"first one: {sample.strip()}")
                self.problems.append(msg)
                log("  PROBLEM: " + msg)
                log("  server log tail:\n" + srv.log_tail(1500))
        if run["socket_errors"]:
            self.problems.append(f"{kind} {phase} round {rnd}: {run['socket_errors']} socket errors "
                                 f"(connect/read/write/timeout) reported by wrk")
        return run

    def phase(self, phase: str, links: int, sets: dict, warm: Path, rounds: int, variants=()):
        """Rounds of floor, service, then each variant's service run, on the round's bodies
        (the consent and match variants on their own)."""
        for rnd in range(1, rounds + 1):
            bodies = sets[f"{phase}-r{rnd}"]
            for kind in ("floor", "service", *(f"service-{v}" for v in variants)):
                v = kind.removeprefix("service-")
                if v in ("consent", "match"):
                    self.measure_clean(kind, phase, links, rnd, sets[f"{v}-r{rnd}"], sets[f"warmup-{v}"])
                else:
                    self.measure_clean(kind, phase, links, rnd, bodies, warm)

    def measure_clean(self, kind, phase, links, rnd, bodies, warm):
        """A run that other processes disturbed (> OTHER_MAX cores during it) is run again,
        up to --retries times; the least disturbed attempt is kept."""
        attempts = []
        for _ in range(1 + self.args.retries):
            attempts.append(self.measure(kind, phase, links, rnd, bodies, warm))
            if attempts[-1]["cpu_cores"]["other"] <= OTHER_MAX:
                break
            log(f"  other processes used {attempts[-1]['cpu_cores']['other']:.2f} cores during that run")
        keep = min(attempts, key=lambda r: r["cpu_cores"]["other"])
        for r in attempts:
            self.runs.remove(r)
            if r is not keep:
                self.discarded.append(r)
        keep["attempts"] = len(attempts)
        self.runs.append(keep)
        return keep

    def audit_counts(self) -> dict:
        """Audit outcomes over both databases; links and matches per target in the main one."""
        audit: dict = {}
        for db in (self.db, self.es_db):
            if not db.exists():
                continue
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                for outcome, n in con.execute("SELECT outcome, count(*) FROM audit_event GROUP BY outcome"):
                    audit[outcome] = audit.get(outcome, 0) + n
                if db == self.db:
                    links = dict(con.execute(
                        "SELECT t.base_url || ' ' || l.origin, count(*) FROM patient_link l "
                        "JOIN target t ON t.id = l.target_id GROUP BY t.base_url, l.origin").fetchall())
            finally:
                con.close()
        return {"audit": audit, "links": links}


def code_fingerprint() -> str:
    """A hash of the service's code as gunicorn will load it (the package and wsgi.py)."""
    h = hashlib.sha256()
    for path in sorted([*(ROOT / "token_exchange").rglob("*.py"), ROOT / "wsgi.py"]):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_head() -> str:
    """The checked-out commit, read from .git without running git."""
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        p = ROOT / ".git" / ref
        if p.exists():
            return f"{p.read_text().strip()[:12]} ({ref.rsplit('/', 1)[-1]})"
        for line in (ROOT / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return f"{line[:12]} ({ref.rsplit('/', 1)[-1]})"
    except OSError:
        pass
    return "unknown"


# -- machine and report -----------------------------------------------------------
def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    libs = {}
    for name in ("Flask", "Werkzeug", "Authlib", "PyJWT", "cryptography", "SQLAlchemy", "alembic", "gunicorn"):
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libs[name] = "-"
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        libs["OpenSSL"] = backend.openssl_version_text()
    except Exception:  # noqa: BLE001 - informational only
        pass
    libs["SQLite"] = sqlite3.sqlite_version
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return {
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "cpu_model": model.group(1).strip() if model else "unknown",
        "mem_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libs": libs,
        "wrk": (wrk_v.stdout + wrk_v.stderr).splitlines()[0].strip(),
        "git_head": git_head(),
    }


def summarize(runs, phase):
    def sel(app):
        return [r for r in runs if r["phase"] == phase and r["app"] == app]
    svc, flo = sel("service"), sel("floor")
    if not svc or not flo:
        return None
    mean = statistics.fmean
    return {
        "service_rate": mean(r["exchanges_per_s"] for r in svc),
        "floor_rate": mean(r["exchanges_per_s"] for r in flo),
        "round_ratios": [s["exchanges_per_s"] / f["exchanges_per_s"] for s, f in zip(svc, flo)],
        "ratio_of_means": mean(r["exchanges_per_s"] for r in svc) / mean(r["exchanges_per_s"] for r in flo),
        "ratio": statistics.median(s["exchanges_per_s"] / f["exchanges_per_s"] for s, f in zip(svc, flo)),
        "service_cpu_ms": statistics.median(r["app_cpu_ms_per_exchange"] for r in svc),
        "floor_cpu_ms": statistics.median(r["app_cpu_ms_per_exchange"] for r in flo),
        "cpu_ratio": statistics.median(f["app_cpu_ms_per_exchange"] / s["app_cpu_ms_per_exchange"]
                                       for s, f in zip(svc, flo)),
        "service_p50": statistics.median(r["p50_ms"] for r in svc),
        "service_p99": statistics.median(r["p99_ms"] for r in svc),
        "floor_p50": statistics.median(r["p50_ms"] for r in flo),
        "floor_p99": statistics.median(r["p99_ms"] for r in flo),
        "service_rss": max(max(r["rss_peak_mib"] or [0]) for r in svc),
        "floor_rss": max(max(r["rss_peak_mib"] or [0]) for r in flo),
        "service_non2xx": sum(r["non2xx"] for r in svc),
        "floor_non2xx": sum(r["non2xx"] for r in flo),
    }


def summarize_variant(runs, kind):
    """A variant's runs against the floor run and the RS256 service run of their own round."""
    rounds: dict = {}
    for r in runs:
        if r["phase"] == "small":
            rounds.setdefault(r["round"], {})[r["app"]] = r
    full = [rd for _, rd in sorted(rounds.items()) if {"floor", "service", kind} <= rd.keys()]
    if not full:
        return None
    v = [rd[kind] for rd in full]
    return {
        "rate": statistics.fmean(r["exchanges_per_s"] for r in v),
        "floor_ratios": [rd[kind]["exchanges_per_s"] / rd["floor"]["exchanges_per_s"] for rd in full],
        "service_ratios": [rd[kind]["exchanges_per_s"] / rd["service"]["exchanges_per_s"] for rd in full],
        "cpu_ms": statistics.median(r["app_cpu_ms_per_exchange"] or 0 for r in v),
        "service_cpu_ms": statistics.median(rd["service"]["app_cpu_ms_per_exchange"] or 0 for rd in full),
        "p50": statistics.median(r["p50_ms"] for r in v),
        "p99": statistics.median(r["p99_ms"] for r in v),
        "rss": max(max(r["rss_peak_mib"] or [0]) for r in v),
        "non2xx": sum(r["non2xx"] for r in v),
    }


def report(info, args, command, crypto, runs, discarded, summaries, imports, checks, problems, sizes, started,
           wall, variants=None) -> str:
    variants = variants or {}
    L = []
    w = L.append
    small, big = summaries["small"], summaries["big"]
    ceiling = crypto["ceiling_per_s"]
    w("# token-exchange benchmark results\n")
    w(f"Recorded {started} by `bench/run.py` (wall time {wall / 60:.1f} min). "
      "Regenerate with the command below; this file is overwritten.\n")
    w("## Command\n")
    w("```sh\n" + command + "\n```\n")
    w("## Machine\n")
    w("| | |\n|---|---|")
    w(f"| cores (`nproc`) | {info['nproc']} |")
    w(f"| CPU | {info['cpu_model']} |")
    w(f"| memory | {info['mem_gib']} GiB |")
    w(f"| kernel | {info['kernel']} |")
    w(f"| Python | {info['python']} |")
    w("| libraries | " + ", ".join(f"{k} {v}" for k, v in info["libs"].items()) + " |")
    w(f"| load generator | {info['wrk']} |")
    w(f"| code | commit {info['git_head']}; see Checks for the code each service run loaded |")
    w("")
    w(f"wrk runs on the same {info['nproc']} cores as the two gunicorn workers, so every figure here "
      "includes the cost of generating the load; the ratios cancel most of it, the absolute rates do not.\n")
    w("## Headline\n")
    if small:
        w(f"- **service ÷ floor = {small['ratio']:.2f}** at {args.links:,} links: the median of the rounds' "
          f"ratios ({', '.join(f'{x:.2f}' for x in small['round_ratios'])}), each round a floor run and the "
          f"service run right after it (ratio of the mean rates: {small['ratio_of_means']:.2f}).")
        w(f"- CPU cost per exchange (gunicorn master + workers, CPU time ÷ 2xx answers): service "
          f"{small['service_cpu_ms']:.2f} ms, floor {small['floor_cpu_ms']:.2f} ms; floor ÷ service = "
          f"**{small['cpu_ratio']:.2f}**, the throughput ratio the two would show with the cores to themselves "
          "(less sensitive to other load on a shared machine than the rates).")
        w(f"- service: **{small['service_rate']:.0f} exchanges/s**, p50 {small['service_p50']:.1f} ms, "
          f"p99 {small['service_p99']:.1f} ms, peak RSS {small['service_rss']:.0f} MiB per worker, "
          f"{small['service_non2xx']} non-2xx.")
        w(f"- floor: {small['floor_rate']:.0f} exchanges/s, p50 {small['floor_p50']:.1f} ms, "
          f"p99 {small['floor_p99']:.1f} ms, peak RSS {small['floor_rss']:.0f} MiB per worker.")
        w(f"- crypto-only ceiling: {ceiling:.0f} exchanges/s; floor ÷ ceiling = "
          f"{small['floor_rate'] / ceiling:.2f}, service ÷ ceiling = {small['service_rate'] / ceiling:.2f}.")
    for name, v in variants.items():
        if v:
            w(f"- variant **{name}**: {v['rate']:.0f} exchanges/s, ÷ floor = **{statistics.median(v['floor_ratios']):.2f}**, "
              f"÷ the RS256 service of the same round = {statistics.median(v['service_ratios']):.2f}; CPU per exchange "
              f"{v['cpu_ms']:.2f} ms (RS256 service {v['service_cpu_ms']:.2f} ms); p50 {v['p50']:.1f} ms, "
              f"p99 {v['p99']:.1f} ms (see Variants).")
    if big and small:
        w(f"- at {args.big_links:,} links: **service ÷ floor = {big['ratio']:.2f}** (vs {small['ratio']:.2f} at "
          f"{args.links:,}; per round: {', '.join(f'{x:.2f}' for x in big['round_ratios'])}); CPU per exchange "
          f"{big['service_cpu_ms']:.2f} ms (vs {small['service_cpu_ms']:.2f} ms), CPU-cost ratio "
          f"{big['cpu_ratio']:.2f} (vs {small['cpu_ratio']:.2f}); service "
          f"{big['service_rate']:.0f} exchanges/s, p50 {big['service_p50']:.1f} ms, p99 {big['service_p99']:.1f} ms "
          f"(at {args.links:,}: {small['service_rate']:.0f}/s, {small['service_p50']:.1f} ms, "
          f"{small['service_p99']:.1f} ms). The ratio is the drift-free comparison; the raw rates move with "
          "whatever else the machine is doing (see the CPU column below).")
    w("")
    w("## Runs\n")
    w("Floor and service runs alternate; each run starts a fresh `gunicorn -w 2`, sends one exchange by hand, "
      f"warms up for {args.warmup:g} s with the warm-up token set, then measures for {args.duration:g} s "
      f"(`wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency`). Exchanges/s counts 2xx "
      "responses only. Peak RSS is VmHWM of each worker (children of the gunicorn master) at the end of the run.\n")
    w("| links | round | app | exchanges/s | p50 ms | p99 ms | non-2xx | socket errors | requests | "
      "peak RSS per worker (MiB) | app CPU ms per exchange | CPU cores: app / wrk / other / idle |")
    w("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for r in runs:
        c = r["cpu_cores"]
        w(f"| {r['links']:,} | {r['round']} | {r['app']} | {r['exchanges_per_s']:.1f} | {r['p50_ms']:.2f} | "
          f"{r['p99_ms']:.2f} | {r['non2xx']} | {r['socket_errors']} | {r['requests']:,} | "
          f"{' / '.join(f'{x:.0f}' for x in r['rss_peak_mib'])} | {r['app_cpu_ms_per_exchange'] or 0:.2f} | "
          f"{c['app']:.2f} / {c['wrk']:.2f} / {c['other']:.2f} / {c['idle']:.2f} |")
    w("")
    w("CPU cores are averages over the measured run, from /proc: *app* = the gunicorn master and workers, "
      "*wrk* = the load generator, *other* = every other process on the machine (a shared machine shows it "
      f"here; each run first waits up to {args.quiet_wait:g} s for other processes to use under 0.2 cores), "
      "*idle* = unused.\n")
    if discarded:
        w(f"{len(discarded)} disturbed run(s) were done again and dropped (their figures are in "
          "bench/out/results.json of the run that wrote this file, which git ignores).\n")
    busy = [r for r in runs if r["cpu_cores"]["other"] > OTHER_MAX]
    if busy:
        w(f"**{len(busy)} of {len(runs)} kept runs shared the cores with other work (other > {OTHER_MAX} cores)**; their "
          "rates understate what this machine can do, and a ratio is only as good as its two runs' "
          "conditions are alike.\n")
    w("## Summary by link count\n")
    w("| links | service exchanges/s | floor exchanges/s | service ÷ floor | service ÷ ceiling | floor ÷ ceiling | "
      "service p50 / p99 ms | floor p50 / p99 ms | service peak RSS MiB | CPU ms per exchange service / floor | "
      "CPU-cost ratio |")
    w("|---:|---:|---:|---:|---:|---:|---|---|---:|---|---:|")
    for links, s in ((args.links, small), (args.big_links, big)):
        if s:
            w(f"| {links:,} | {s['service_rate']:.1f} | {s['floor_rate']:.1f} | **{s['ratio']:.2f}** | "
              f"{s['service_rate'] / ceiling:.2f} | {s['floor_rate'] / ceiling:.2f} | "
              f"{s['service_p50']:.1f} / {s['service_p99']:.1f} | {s['floor_p50']:.1f} / {s['floor_p99']:.1f} | "
              f"{s['service_rss']:.0f} | {s['service_cpu_ms']:.2f} / {s['floor_cpu_ms']:.2f} | {s['cpu_ratio']:.2f} |")
    w("")
    if variants:
        w("## Variants\n")
        w(f"Each round at {args.links:,} links runs the floor, the service (RS256), then each variant's service "
          "run, every run a fresh `gunicorn -w 2` with its own warm-up; ratios are per round, then the median. "
          "What each variant changes:\n")
        for name in variants:
            w(f"- **{name}**: {VARIANTS[name]}.")
        w("")
        w("| variant | exchanges/s | ÷ floor (per round) | ÷ floor | ÷ RS256 service (per round) | ÷ RS256 service | "
          "p50 / p99 ms | CPU ms per exchange (RS256 service) | peak RSS MiB | non-2xx |")
        w("|---|---:|---|---:|---|---:|---|---|---:|---:|")
        for name, v in variants.items():
            if v:
                w(f"| {name} | {v['rate']:.1f} | {', '.join(f'{x:.2f}' for x in v['floor_ratios'])} | "
                  f"**{statistics.median(v['floor_ratios']):.2f}** | "
                  f"{', '.join(f'{x:.2f}' for x in v['service_ratios'])} | "
                  f"{statistics.median(v['service_ratios']):.2f} | {v['p50']:.1f} / {v['p99']:.1f} | "
                  f"{v['cpu_ms']:.2f} ({v['service_cpu_ms']:.2f}) | {v['rss']:.0f} | {v['non2xx']} |")
        w("")
        if "match" in variants:
            w("The match variant's CPU column counts the service only; the fake FHIR server answering its "
              "searches runs in the benchmark process (not counted as *other*). Every one of its exchanges "
              "is a patient's first: a matched link is never matched again within `--match-ttl`, so the next "
              "exchange for that patient costs what the RS256 row costs.\n")
    w("## Crypto-only ceiling\n")
    w("Measured in the benchmark process, one thread, best of 5 batches, RSA-2048 "
      f"(other processes meanwhile: {crypto.get('other_cores', 0):.2f} cores):\n")
    w("| operation | PyJWT (as the floor calls it) | raw cryptography |")
    w("|---|---:|---:|")
    w(f"| RS256 verify | {crypto['pyjwt_verify_s'] * 1e6:.0f} µs | {crypto['raw_verify_s'] * 1e6:.0f} µs |")
    w(f"| RS256 sign | {crypto['pyjwt_sign_s'] * 1e6:.0f} µs | {crypto['raw_sign_s'] * 1e6:.0f} µs |")
    if "pyjwt_es256_sign_s" in crypto:
        w(f"| ES256 sign (P-256; the es256 variant's minting) | {crypto['pyjwt_es256_sign_s'] * 1e6:.0f} µs | |")
    w("")
    w(f"Ceiling = cores ÷ (2 × verify + 1 sign) = {crypto['cores']} ÷ {crypto['per_exchange_s'] * 1e3:.3f} ms "
      f"= **{ceiling:.0f} exchanges/s** (PyJWT figures). Nothing that verifies two RS256 tokens and signs one "
      "can beat it on this machine; it ignores HTTP, parsing and the load generator.\n")
    w("## Setup\n")
    w("- A fresh SQLite database in a temp dir (`TOKEN_EXCHANGE_DATABASE_URL=sqlite:///TMP/te.db`, "
      "`TOKEN_EXCHANGE_ISSUER=http://127.0.0.1:PORT`), configured only with the CLI: `db upgrade`, "
      "`issuer add EHR --jwks-uri EHR/jwks --source https://fhir.a.example/fhir --algs RS256`, "
      "`target add https://fhir.b.example/fhir --name hospital-b`, `client add vendor --secret-env ...` "
      f"({len(CLIENT_SECRET)}-character secret, HTTP Basic), "
      "`trust add ... --scopes 'patient/*.rs' --upstream-client-id vendor-at-ehr`, `link import FILE.csv`.")
    if "consent" in variants:
        w(f"- Variant consent: `target add {TARGET_CONSENT} --name hospital-c`, `trust add ... --consent required "
          "--consent-max-days 365`, the same links for it, and one recorded consent per linked patient (user "
          "consent-user-K for patient K, `patient/*.rs`), written with the service's own models as the approval "
          "page writes them (no command grants consent on a user's behalf). Its tokens' `sub` is that user; "
          "the ID token carries a random `nonce`, so every pair is still distinct.")
    if "match" in variants:
        w(f"- Variant match: `issuer update EHR --identifier-system {MATCH_SYSTEM}`, `target add "
          f"http://127.0.0.1:PORT/fhir --name hospital-m --match-identifier {MATCH_SYSTEM}`, a trust for it. Its "
          "ID tokens name patients no link or earlier match knows (a distinct range per round and for the "
          "warm-up), with `patient_identifier` of that system.")
    if "es256" in variants:
        w("- Variant es256: a copy of the set-up database (SQLite backup), then `keys stage --alg ES256` and "
          "`keys rotate` on it; the service run with `TOKEN_EXCHANGE_DATABASE_URL` pointing at the copy.")
    for imp in imports:
        w(f"- `link import` of {imp['rows']:,} rows: {imp['seconds']:.1f} s, peak RSS of the CLI process "
          f"{imp['peak_rss_mib']:.0f} MiB ({imp['output']}).")
    w(f"- Fake EHR: RSA-2048 key; its JWKS served by the benchmark process on loopback. Tokens as in the smoke "
      f"harness (access token: iss, sub, aud, client_id, scope `{EHR_SCOPE}`, iat, exp, jti; ID token: iss, sub, "
      "aud, azp, iat, exp, fhirUser, patient, source), `sub` distinct per pair, patients drawn at random from "
      "all linked patients.")
    w(f"- Request bodies: {sizes['per_run']:,} distinct token pairs per round (shared by that round's floor and "
      f"service runs; more than the crypto ceiling allows in {args.duration:g} s), a separate warm-up set of "
      f"{sizes['warmup']:,} pairs; each run also restarts gunicorn, so no cache of verified tokens can help. "
      f"Request: `POST /token`, form {TE} with subject_token (access token), actor_token (ID token, "
      f"`{IDT}`), resource={TARGET}, scope={REQ_SCOPE}.")
    w("- Service: `gunicorn -w 2 -b 127.0.0.1:PORT wsgi:app` (cwd the project, with the two env vars). "
      "Floor: `gunicorn -w 2 -b 127.0.0.1:PORT --chdir bench floor_app:app` with "
      "`FLOOR_EHR_PEM`. Same bodies, same wrk script (`bench/token.lua`).")
    w("")
    w("## Checks\n")
    for c in checks:
        w(f"- {c}")
    if problems:
        w("\n## Problems found\n")
        for p in problems:
            w(f"- {p}")
    w("")
    return "\n".join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark the token-exchange service against the floor app.")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test the script: 3 s runs, 1 s warm-ups, 100,000 links instead of 1,000,000")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 8; --quick 3)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up before each run (default 2; --quick 1)")
    p.add_argument("--rounds", type=int, default=4, help="floor+service rounds per link count (default 4)")
    p.add_argument("--quiet-wait", type=float, help="before each run, wait up to this many seconds for other "
                   "processes to leave the cores alone (default 120; --quick 10)")
    p.add_argument("--retries", type=int, default=2, help="run again a run that other processes disturbed "
                   "(default: up to 2 more times; the least disturbed attempt is kept)")
    p.add_argument("--links", type=int, default=1000, help="patient links for the main runs (default 1000)")
    p.add_argument("--big-links", type=int, help="links for the repeat (default 1,000,000; --quick 100,000)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--out", help="report path (default bench/RESULTS.md; --quick bench/out/RESULTS-quick.md)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (database, logs, bodies)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated service variants run in every round at --links: {', '.join(VARIANTS)} "
                        "(default all), or 'none'")
    args = p.parse_args(argv)
    args.variants = [] if args.variants.strip() in ("", "none") else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)} or 'none'")
    args.duration = args.duration or (3 if args.quick else 8)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (10 if args.quick else 90)
    args.big_links = args.big_links or (100_000 if args.quick else 1_000_000)
    out = Path(args.out) if args.out else (OUT / "RESULTS-quick.md" if args.quick else BENCH / "RESULTS.md")
    if args.big_links <= args.links:
        p.error("--big-links must be larger than --links")

    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is not installed. It is the load generator this benchmark drives the service "
                 "with; install it with:  apt-get install -y wrk")
    for exe in ("token-exchange", "gunicorn"):
        if not (BIN / exe).exists():
            sys.exit(f"bench: {BIN / exe} is missing; install the project: .venv/bin/pip install -e '.[test]'")
    if not (FLOOR_DIR / "floor_app.py").exists():
        sys.exit(f"bench: the floor app {FLOOR_DIR / 'floor_app.py'} is missing")

    command = "python bench/run.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    started_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.time()
    info = machine()
    log(f"{info['nproc']} cores, {info['cpu_model']}, Python {info['python']}; load avg {os.getloadavg()[0]:.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="te-bench-"))
    ehr = FakeEHR()
    fhir = FakeFHIR() if "match" in args.variants else None
    bench = Bench(args, tmp, ehr, fhir)
    try:
        log(f"setting up the service in {tmp} (fake EHR at {ehr.issuer})")
        imports = [bench.setup_world(args.links)]
        if args.variants:
            log(f"setting up the variants: {', '.join(args.variants)}")
            imports += bench.setup_variants(args.links)

        log("measuring RS256 verify/sign in-process for the crypto-only ceiling")
        wait_quiet(args.quiet_wait)
        b0, o0, t_0 = busy_seconds(), time.process_time(), time.perf_counter()
        crypto = measure_crypto(ehr)
        crypto["other_cores"] = max(0.0, busy_seconds() - b0 - (time.process_time() - o0)) / (
            time.perf_counter() - t_0)
        log(f"  verify {crypto['pyjwt_verify_s'] * 1e6:.0f} µs, sign {crypto['pyjwt_sign_s'] * 1e6:.0f} µs "
            f"-> ceiling {crypto['ceiling_per_s']:.0f} exchanges/s on {crypto['cores']} cores")

        # No run can exceed the ceiling, so this many pairs per round never wrap.
        per_run = max(1000, math.ceil(crypto["ceiling_per_s"] * args.duration * 1.1))
        warm_n = max(500, math.ceil(crypto["ceiling_per_s"] * args.warmup * 1.1))
        sizes = {"per_run": per_run, "warmup": warm_n}
        log(f"signing request bodies: {per_run} pairs per round, {warm_n} for warm-ups")
        sets = [("warmup", warm_n, args.links)]
        sets += [(f"small-r{r}", per_run, args.links) for r in range(1, args.rounds + 1)]
        sets += [(f"big-r{r}", per_run, args.big_links) for r in range(1, args.rounds + 1)]
        sets = [(*st, "std") for st in sets]
        if "consent" in args.variants:
            sets.append(("warmup-consent", warm_n, args.links, "consent"))
            sets += [(f"consent-r{r}", per_run, args.links, "consent") for r in range(1, args.rounds + 1)]
        if "match" in args.variants:
            # A first-time match costs an outbound search and two more writes: half as many suffice.
            match_n = max(1000, per_run // 2)
            sets.append(("warmup-match", warm_n, range(0, warm_n), "match"))
            sets += [(f"match-r{r}", match_n, range(r * 10_000_000, r * 10_000_000 + match_n), "match")
                     for r in range(1, args.rounds + 1)]
        files = make_bodies(ehr, sets, tmp, fhir.base if fhir else None)

        log(f"phase 1: {args.links:,} links, {args.rounds} rounds of floor then service"
            + (f", then the variants {', '.join(args.variants)}" if args.variants else ""))
        bench.phase("small", args.links, files, files["warmup"], args.rounds, args.variants)

        log(f"importing {args.big_links - args.links:,} more links ({args.big_links:,} in all)")
        imports.append(bench.import_links(args.links, args.big_links))
        log(f"phase 2: {args.big_links:,} links, {args.rounds} rounds of floor then service")
        bench.phase("big", args.big_links, files, files["warmup"], args.rounds)

        counts = bench.audit_counts()
        checks = []
        granted = counts["audit"].get("granted", 0)
        refused = counts["audit"].get("refused", 0)
        table_links = counts["links"].get(f"{TARGET} table", 0)
        checks.append(f"patient links for {TARGET} at the end: {table_links:,} (expected {args.big_links:,}).")
        if table_links != args.big_links:
            bench.problems.append(f"patient_link holds {table_links} rows for {TARGET}, not {args.big_links}")
        if fhir:
            matched = counts["links"].get(f"{fhir.base} matched", 0)
            match_ok = sum(r["ok"] for r in bench.runs if r["app"] == "service-match")
            checks.append(f"variant match: {fhir.searches:,} searches at the fake target, {matched:,} links "
                          f"stored with origin matched, {match_ok:,} 2xx answers in the kept measured match "
                          "runs (the searches also count warm-ups, hand-sent exchanges and dropped runs; each "
                          "search stored one link).")
            if matched != fhir.searches:
                bench.problems.append(f"variant match: {fhir.searches} searches but {matched} matched links")
        checks.append(f"audit records: {granted:,} granted, {refused:,} refused; 2xx answers this script saw "
                      f"from the service (wrk and the hand-sent exchanges): {bench.service_2xx_seen:,}, non-2xx "
                      f"{bench.service_non2xx_seen:,}. Granted records may exceed the 2xx count by the requests "
                      "in flight when each wrk run stopped (at most one per connection per run); fewer would "
                      "mean a token without its audit record.")
        if granted < bench.service_2xx_seen:
            bench.problems.append(f"only {granted} granted audit records for {bench.service_2xx_seen} 2xx answers")
        codes = sorted({r["code"] for r in bench.runs if r["app"] == "service"})
        checks.append(f"service code (sha256 of token_exchange/*.py and wsgi.py) at each service run: "
                      f"{', '.join(codes)}; commit {info['git_head']} at the start.")
        if len(codes) > 1:
            bench.problems.append("the service's code changed while the benchmark ran (someone edited "
                                  "token_exchange/), so its runs measured different code: "
                                  + ", ".join(f"{r['phase']} r{r['round']}: {r['code']}"
                                              for r in bench.runs if r["app"] == "service"))
        wrapped = sum(r["wrapped"] for r in bench.runs)
        checks.append(f"token re-use: {'none' if not wrapped else wrapped} (a body file running out would "
                      "re-send tokens).")
        non2xx_svc = sum(r["non2xx"] for r in bench.runs if r["app"] == "service")
        checks.append(f"service non-2xx in measured runs: {non2xx_svc}; wrk's own 'Non-2xx or 3xx' count: "
                      f"{sum(r['wrk_non2xx_or_3xx'] for r in bench.runs if r['app'] == 'service')}.")
        checks.append(f"EHR JWKS fetches during the benchmark: {ehr.jwks_hits} "
                      "(the service caches the issuer's keys; about one fetch per worker per run is expected).")

        summaries = {"small": summarize(bench.runs, "small"), "big": summarize(bench.runs, "big")}
        variants = {v: summarize_variant(bench.runs, f"service-{v}") for v in args.variants}
        wall = time.time() - t0
        text = report(info, args, command, crypto, bench.runs, bench.discarded, summaries, imports, checks,
                      bench.problems, sizes, started_at, wall, variants)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        OUT.mkdir(parents=True, exist_ok=True)
        raw = OUT / ("results-quick.json" if args.quick else "results.json")
        raw.write_text(json.dumps({"command": command, "machine": info, "crypto": crypto, "sizes": sizes,
                                   "imports": imports, "runs": bench.runs, "discarded_runs": bench.discarded,
                                   "summaries": summaries, "variants": variants,
                                   "checks": checks, "problems": bench.problems}, indent=1))
        log(f"wrote {out} and {raw}")
        s = summaries["small"]
        print(f"\nservice ÷ floor = {s['ratio']:.2f} (CPU-cost ratio {s['cpu_ratio']:.2f})   service {s['service_rate']:.0f}/s "
              f"(p50 {s['service_p50']:.1f} ms, p99 {s['service_p99']:.1f} ms)   floor {s['floor_rate']:.0f}/s   "
              f"ceiling {crypto['ceiling_per_s']:.0f}/s")
        if summaries["big"]:
            b = summaries["big"]
            print(f"at {args.big_links:,} links: service {b['service_rate']:.0f}/s (p50 {b['service_p50']:.1f} ms, "
                  f"p99 {b['service_p99']:.1f} ms), service ÷ floor = {b['ratio']:.2f}")
        for v, vs in variants.items():
            if vs:
                print(f"variant {v}: {vs['rate']:.0f}/s, ÷ floor {statistics.median(vs['floor_ratios']):.2f}, "
                      f"÷ RS256 service {statistics.median(vs['service_ratios']):.2f}")
        if bench.problems:
            print("\nPROBLEMS:\n- " + "\n- ".join(bench.problems))
        return 1 if bench.problems else 0
    finally:
        ehr.stop()
        if fhir:
            fhir.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
