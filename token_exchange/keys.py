"""The service's signing keys and the tokens it mints (RFC 9068 at+jwt).

Key life: staged (published in /jwks, not yet signing) -> active (signing) ->
retired (published for TOKEN_EXCHANGE_KEY_GRACE, so tokens already out keep
verifying) -> pruned.
"""
from __future__ import annotations

import base64
import json
import secrets
from datetime import datetime, timedelta, timezone

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SIGNING_ALGS = ("RS256", "PS256", "ES256", "ES384")
DEFAULT_ALG = "RS256"
_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1}
# SMART Backend Services (client-confidential-asymmetric): assertions are RS384 or ES384,
# so an RSA key signs them RS384 and a P-384 key ES384; a P-256 key cannot.
BACKEND_SERVICES_ALGS = {"RS256": "RS384", "PS256": "RS384", "ES384": "ES384"}


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
    __slots__ = ("kid", "alg", "_key", "_algorithm", "_header")

    def __init__(self, kid: str, alg: str, pem: str):
        self.kid, self.alg = kid, alg
        self._algorithm = jwt.get_algorithm_by_name(alg)
        self._key = self._algorithm.prepare_key(load_private(pem))
        # RFC 9068 §2.1: typ "at+jwt". The header never changes for a key: encode it once.
        self._header = _b64(json.dumps({"alg": alg, "kid": kid, "typ": "at+jwt"}, separators=(",", ":")).encode())

    def __repr__(self):
        return f"ActiveKey(kid={self.kid!r}, alg={self.alg!r})"

    def client_assertion(self, client_id: str, token_endpoint: str, lifetime: int = 300) -> str:
        """A private_key_jwt client assertion (RFC 7523 §2.2, §3) as SMART Backend
        Services asks: iss = sub = client_id, aud = the token endpoint, exp at most
        5 minutes ahead, a fresh jti, header kid and typ JWT; RS384 with an RSA key,
        ES384 with a P-384 key. Built with Authlib's client-side helper; the private
        key does not leave this object. ValueError for a key that cannot sign one."""
        from authlib.oauth2.rfc7523 import private_key_jwt_sign
        from joserfc.jwk import ECKey, RSAKey
        alg = BACKEND_SERVICES_ALGS.get(self.alg)
        if alg is None:
            raise ValueError(f"a {self.alg} key cannot sign SMART Backend Services assertions (RS384 or ES384)")
        key = (RSAKey if alg == "RS384" else ECKey).import_key(self._key)
        return private_key_jwt_sign(key, client_id, token_endpoint, alg=alg, header={"kid": self.kid, "typ": "JWT"},
                                    expires_in=min(lifetime, 300))

    def mint(self, claims: dict) -> str:
        """A compact JWS (RFC 7515 §7.1) signed with PyJWT's algorithm object."""
        signing_input = self._header + b"." + _b64(json.dumps(claims, separators=(",", ":")).encode())
        return (signing_input + b"." + _b64(self._algorithm.sign(signing_input, self._key))).decode()

    def assertion(self, claims: dict) -> str:
        """A JWT the service signs as a client (RFC 7523 §2.2 client assertion): typ JWT,
        never at+jwt, so it cannot pass for an access token."""
        header = _b64(json.dumps({"alg": self.alg, "kid": self.kid, "typ": "JWT"}, separators=(",", ":")).encode())
        signing_input = header + b"." + _b64(json.dumps(claims, separators=(",", ":")).encode())
        return (signing_input + b"." + _b64(self._algorithm.sign(signing_input, self._key))).decode()


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def published(rows, grace: int, now: datetime | None = None) -> list[dict]:
    """Public JWKs to publish: staged, active, and retired keys inside the grace period."""
    now = now or datetime.now(timezone.utc)
    out = []
    for row in rows:
        if row.state in ("staged", "active"):
            out.append(row.public_jwk)
        elif row.state == "retired" and row.retired is not None and \
                _aware(row.retired) + timedelta(seconds=grace) > now:
            out.append(row.public_jwk)
    return out


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
