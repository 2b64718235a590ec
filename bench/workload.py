"""What the load is made of: RS256-signed (access token, ID token) pairs from tests/fakes.py's
FakeEHR, as urlencoded POST /token bodies, one file per set; and the crypto-only ceiling."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from fakes import FakeEHR

from bench.common import (AT, CLIENT_ID, IDT, MATCH_SYSTEM, REQ_SCOPE, SOURCE, TARGET, TARGET_CONSENT,
                          TARGET_USER_ASIS, TARGET_USER_MAPPED, TE, USER_SCOPE, USER_SYSTEM, USERS,
                          TOKEN_TTL, log)

EHR_NAME = "bench-ehr"  # the fake EHR's path on loopback; its key id is bench-ehr-k1

# Set in the parent before forking the signing pool; read by _sign_chunk.
_EHR: FakeEHR | None = None
_MATCH_TARGET = None
_USER_MATCH_TARGET = None


def fake_ehr() -> FakeEHR:
    """The EHR the benchmark's tokens come from: an RSA-2048 key and its JWKS on loopback."""
    return FakeEHR(EHR_NAME)


def patient_id(n: int) -> str:
    return f"a-{n:07d}"


def _sign_chunk(task):
    """(tag, first index, patient numbers, kind) -> form bodies, one pair of tokens each.
    kind: "std" (linked patients), "consent" (each patient's consenting user),
    "match" (patients with no link, carrying an identifier the target is searched by),
    "user-as-is" / "user-mapped" (linked patients, user/ scopes too, at those targets) or
    "user-match" (users with no user link, carrying an NPI the target is searched by)."""
    tag, first, patients, kind = task
    out = []
    for i, pn in enumerate(patients, start=first):
        sub = f"user-{tag}-{i}"  # distinct per pair: no two ID tokens alike either
        ident = {"fhirUser": f"{SOURCE}/Practitioner/pr-{i % USERS}", "patient": patient_id(pn)}
        resource, scope = TARGET, REQ_SCOPE
        if kind == "consent":
            sub = f"consent-user-{pn}"  # the user who consented for this patient
            ident["nonce"] = uuid.uuid4().hex  # keeps this user's ID tokens distinct
            resource = TARGET_CONSENT
        elif kind == "match":
            ident["patient"] = f"m-{pn:09d}"  # never linked, never matched before
            ident["patient_identifier"] = [f"{MATCH_SYSTEM}|{pn:09d}"]
            resource = _MATCH_TARGET
        elif kind in ("user-as-is", "user-mapped"):
            resource = TARGET_USER_ASIS if kind == "user-as-is" else TARGET_USER_MAPPED
            scope = f"{REQ_SCOPE} {USER_SCOPE}"
        elif kind == "user-match":
            ident["fhirUser"] = f"{SOURCE}/Practitioner/u-{pn:09d}"  # never linked, never matched before
            ident["fhirUser_identifier"] = [f"{USER_SYSTEM}|{pn:09d}"]
            resource, scope = _USER_MATCH_TARGET, USER_SCOPE
        out.append(urlencode([
            ("grant_type", TE),
            ("subject_token", _EHR.access_token(sub=sub, ttl=TOKEN_TTL)),
            ("subject_token_type", AT),
            ("actor_token", _EHR.id_token(sub=sub, ttl=TOKEN_TTL, **ident)),
            ("actor_token_type", IDT),
            ("resource", resource),
            ("scope", scope),
        ]))
    return out


def make_bodies(ehr: FakeEHR, sets: list[tuple], tmp: Path, match_target: str | None = None,
                user_match_target: str | None = None) -> dict[str, Path]:
    """sets: (tag, count, patients, kind) -> {tag: file of form bodies, one per line}.
    patients is a number N (each pair's patient drawn at random from the first N) or a
    range (used in order, each once). Signed in a pool of processes, one per core
    (before any run, so it disturbs none)."""
    global _EHR, _MATCH_TARGET, _USER_MATCH_TARGET
    _EHR, _MATCH_TARGET, _USER_MATCH_TARGET = ehr, match_target, user_match_target
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


def body_sets(args, ceiling_per_s: float) -> tuple[dict, list[tuple]]:
    """How many pairs per round and for warm-ups ({"per_run", "warmup"}), and the sets to sign:
    (tag, count, patients, kind) for make_bodies."""
    # No run can exceed the ceiling, so this many pairs per round never wrap.
    per_run = max(1000, math.ceil(ceiling_per_s * args.duration * 1.1))
    warm_n = max(500, math.ceil(ceiling_per_s * args.warmup * 1.1))
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
    for kind in ("user-as-is", "user-mapped"):
        if kind in args.variants:
            sets.append((f"warmup-{kind}", warm_n, args.links, kind))
            sets += [(f"{kind}-r{r}", per_run, args.links, kind) for r in range(1, args.rounds + 1)]
    if "user-match" in args.variants:  # as match: every exchange a user's first
        match_n = max(1000, per_run // 2)
        sets.append(("warmup-user-match", warm_n, range(0, warm_n), "user-match"))
        sets += [(f"user-match-r{r}", match_n, range(r * 10_000_000, r * 10_000_000 + match_n), "user-match")
                 for r in range(1, args.rounds + 1)]
    return {"per_run": per_run, "warmup": warm_n}, sets


# -- DPoP proofs (variant dpop) --------------------------------------------------------
_DPOP_KEY = None


def dpop_key():
    """The benchmark client's one DPoP key (ES256), made once."""
    global _DPOP_KEY
    if _DPOP_KEY is None:
        _DPOP_KEY = ec.generate_private_key(ec.SECP256R1())
    return _DPOP_KEY


def with_proofs(src: Path, dst: Path, token_endpoint: str) -> Path:
    """Each body of src with a fresh DPoP proof for POST token_endpoint (RFC 9449 §4.2:
    its own jti, iat now), as `body TAB proof` lines (bench/token.lua sends the proof as
    the DPoP header). Made just before a run: a proof is good for 60 s after its iat."""
    key = dpop_key()
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    header = {"typ": "dpop+jwt", "jwk": jwk}
    now = int(time.time())
    with src.open() as f, dst.open("w") as out:
        for line in f:
            body = line.strip()
            if body:
                proof = jwt.encode({"jti": uuid.uuid4().hex, "htm": "POST", "htu": token_endpoint, "iat": now},
                                   key, algorithm="ES256", headers=header)
                out.write(f"{body}\t{proof}\n")
    return dst


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
    token = ehr.access_token(sub="user-1", ttl=3600)
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
