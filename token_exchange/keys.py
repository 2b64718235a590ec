"""The service's signing keys and the tokens it mints (RFC 9068 at+jwt).

Key life: staged (published in /jwks, not yet signing) -> active (signing) ->
retired (published for TOKEN_EXCHANGE_KEY_GRACE, so tokens already out keep
verifying) -> pruned.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from datetime import datetime, timedelta, timezone

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .clock import aware

SIGNING_ALGS = ("RS256", "PS256", "ES256", "ES384")
DEFAULT_ALG = "RS256"
_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1}
# SMART Backend Services (client-confidential-asymmetric): assertions are RS384 or ES384,
# so an RSA key signs them RS384 and a P-384 key ES384; a P-256 key cannot.
# The algorithm of the service's own client assertions (Backend Services, consent sign-in) by
# the signing key's: SMART Backend Services asks RS384 or ES384.
OWN_ASSERTION_ALG = {"RS256": "RS384", "PS256": "RS384", "ES384": "ES384", "ES256": "ES256"}
BACKEND_SERVICES_ALGS = {k: v for k, v in OWN_ASSERTION_ALG.items() if v in ("RS384", "ES384")}
TWIN_SUFFIX = ".rs384"


def client_kid(kid: str, alg: str) -> str:
    """The kid the service's client assertions name: an RSA key is published a second
    time for RS384 (a JWK's alg binds it to one algorithm, and strict verifiers hold
    to it), so assertions signed RS384 name that twin."""
    return kid + TWIN_SUFFIX if OWN_ASSERTION_ALG.get(alg) == "RS384" and alg != "RS384" else kid


def generate(alg: str = DEFAULT_ALG) -> tuple[str, str, dict]:
    """-> (kid, private PEM, public JWK)."""
    if alg in ("RS256", "PS256"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg in _CURVES:
        key = ec.generate_private_key(_CURVES[alg]())
    else:
        raise ValueError(f"unsupported signing algorithm {alg}; use one of {', '.join(SIGNING_ALGS)}")
    kid = secrets.token_urlsafe(12)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    jwk = json.loads(jwt.get_algorithm_by_name(alg).to_jwk(key.public_key()))
    jwk.update(kid=kid, alg=alg, use="sig")
    return kid, pem, jwk


def load_private(pem: str):
    return serialization.load_pem_private_key(pem.encode(), password=None)


class ActiveKey:
    """A loaded signing key; its private part never leaves this object."""
    __slots__ = ("kid", "alg", "_key", "_algorithm", "_header", "_seed")

    def __init__(self, kid: str, alg: str, pem: str):
        self.kid, self.alg = kid, alg
        # Secrets derived from the key (dpop.Nonces): the same on every instance that loads
        # it from the database, and revealing nothing of it.
        self._seed = hashlib.sha256(b"token-exchange derived secrets\0" + pem.encode()).digest()
        self._algorithm = jwt.get_algorithm_by_name(alg)
        self._key = self._algorithm.prepare_key(load_private(pem))
        # RFC 9068 §2.1: typ "at+jwt". The header never changes for a key: encode it once.
        self._header = _b64(json.dumps({"alg": alg, "kid": kid, "typ": "at+jwt"}, separators=(",", ":")).encode())

    def __repr__(self):
        return f"ActiveKey(kid={self.kid!r}, alg={self.alg!r})"

    def client_assertion(self, client_id: str, token_endpoint: str, lifetime: int = 300,
                         backend_services: bool = True) -> str:
        """A private_key_jwt client assertion (RFC 7523 §2.2, §3): iss = sub = client_id,
        aud = the token endpoint, exp at most 5 minutes ahead, a fresh jti, header kid
        and typ JWT. For SMART Backend Services (the default) it is RS384 with an RSA
        key (naming the key's RS384 twin in the JWKS, ``client_kid``) or ES384 with a
        P-384 key; otherwise (an OpenID Connect sign-in) the key's own algorithm.
        Built with Authlib's client-side helper; the private key stays in this object."""
        from authlib.oauth2.rfc7523 import private_key_jwt_sign
        from joserfc.jwk import ECKey, RSAKey
        if backend_services:
            alg, kid = OWN_ASSERTION_ALG[self.alg], client_kid(self.kid, self.alg)
        else:
            alg, kid = self.alg, self.kid
        key = (ECKey if alg.startswith("ES") else RSAKey).import_key(self._key)
        return private_key_jwt_sign(key, client_id, token_endpoint, alg=alg, header={"kid": kid, "typ": "JWT"},
                                    expires_in=min(lifetime, 300))

    def derived_secret(self, label: bytes) -> bytes:
        """A 256-bit secret for ``label``, derived from this key (HMAC-SHA256)."""
        return hmac.new(self._seed, label, hashlib.sha256).digest()

    def mint(self, claims: dict) -> str:
        """A compact JWS (RFC 7515 §7.1) signed with PyJWT's algorithm object."""
        signing_input = self._header + b"." + _b64(json.dumps(claims, separators=(",", ":")).encode())
        return (signing_input + b"." + _b64(self._algorithm.sign(signing_input, self._key))).decode()


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def jwks_max_age(grace: int) -> int:
    """The Cache-Control max-age of /jwks, in seconds: short enough that a rotation reaches
    verifiers well inside the grace period. A key staged less than this long ago may be
    missing from a verifier's cached JWKS (`keys rotate` warns)."""
    return min(300, max(1, grace // 4))


def published(rows, grace: int, now: datetime | None = None, twins: bool = True) -> list[dict]:
    """Public JWKs to publish: staged, active, and retired keys inside the grace period;
    with ``twins``, each RSA key also as its RS384 twin (``client_kid``) for the
    service's own client assertions."""
    now = now or datetime.now(timezone.utc)
    out = []
    for row in rows:
        if row.state in ("staged", "active") or (row.state == "retired" and row.retired is not None
                                                 and aware(row.retired) + timedelta(seconds=grace) > now):
            out.append(row.public_jwk)
            twin_kid = client_kid(row.kid, row.alg)
            if twins and twin_kid != row.kid:
                out.append(dict(row.public_jwk, kid=twin_kid, alg="RS384"))
    return out
