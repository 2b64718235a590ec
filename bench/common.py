"""What every part of the benchmark shares: paths, the exchange's constants, the variants, log()."""
from __future__ import annotations

import time
from pathlib import Path

from fakes import SOURCE, TARGET, UPSTREAM  # tests/fakes.py: the fake EHR's vocabulary

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
LUA = BENCH / "token.lua"
VENV = ROOT / ".venv"
BIN = VENV / "bin"
FLOOR_DIR = Path(__file__).resolve().parent  # bench/floor_app.py: a byte-identical copy of the shared floor app

TE = "urn:ietf:params:oauth:grant-type:token-exchange"
AT = "urn:ietf:params:oauth:token-type:access_token"
IDT = "urn:ietf:params:oauth:token-type:id_token"
EHR_SCOPE = "patient/*.rs user/*.rs openid fhirUser"
REQ_SCOPE = "patient/Observation.rs"
CLIENT_ID = "vendor"
CLIENT_SECRET = "bench-vendor-secret-0123456789abcdef-0123456789"  # >= 32 characters
TOKEN_TTL = 4 * 3600  # EHR tokens outlive the whole benchmark
TARGET_CONSENT = "https://fhir.c.example/fhir"  # variant "consent": its trust requires the user's consent
MATCH_SYSTEM = "urn:oid:2.16.840.1.113883.4.1"  # variant "match": the identifier system both sides trust
TARGET_USER_ASIS = "https://fhir.d.example/fhir"  # variant "user-as-is": user/ scopes, fhirUser passed on
TARGET_USER_MAPPED = "https://fhir.e.example/fhir"  # variant "user-mapped": --users mapped, every user linked
USER_SYSTEM = "http://hl7.org/fhir/sid/us-npi"  # variant "user-match": the users' identifier system
USER_SCOPE = "user/Observation.rs"
USERS = 997  # the Practitioners pr-0 .. pr-996 the standard ID tokens name
VARIANTS = {  # --variants: service runs added to every round of the 1,000-link phase, after the RS256 run
    "es256": "the same exchanges, the service signing with an ES256 (P-256) key instead of RS256",
    "consent": "a trust that requires consent, every user having consented already (one indexed read more "
               "per exchange, and an entry in the audit's partial index of tokens minted under a consent)",
    "match": "every exchange for a patient with no link yet: the service mints itself a search token, "
             "searches the target by identifier (a fake FHIR server on loopback), stores the matched link",
    "user-as-is": "patient/ and user/ scopes asked for at an as-is target (today's user-scope exchange: the "
                  "EHR's fhirUser passed on): the baseline of the next row",
    "user-mapped": "the same at a `--users mapped` target where every user is already mapped (a user link "
                   "each): one indexed read more, and the target's own fhirUser in the token",
    "user-match": "user/ scopes at a `--users mapped` target for a user with no link yet, carrying an NPI: the "
                  "service mints itself a search token, searches the target's Practitioners (the fake FHIR "
                  "server), stores the matched user link",
    "dpop": "the same exchanges, each with a DPoP proof (RFC 9449) signed just before the run by one ES256 "
            "client key: one signature verification more, the proof's jti spent by the audit record, the "
            "token bound to the key (cnf.jkt, token_type DPoP)",
}

__all__ = ["ROOT", "BENCH", "OUT", "LUA", "VENV", "BIN", "FLOOR_DIR", "TE", "AT", "IDT", "SOURCE", "TARGET",
           "UPSTREAM", "EHR_SCOPE", "REQ_SCOPE", "CLIENT_ID", "CLIENT_SECRET", "TOKEN_TTL", "TARGET_CONSENT",
           "MATCH_SYSTEM", "VARIANTS", "TARGET_USER_ASIS", "TARGET_USER_MAPPED", "USER_SYSTEM", "USER_SCOPE", "USERS",
           "log"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
