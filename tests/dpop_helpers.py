"""DPoP proofs made by hand (RFC 9449 §4.2), for the tests of every check the service
makes of them: a key of any algorithm, and proofs with any header or claim changed."""
from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import SERVICE

TOKEN_ENDPOINT = SERVICE + "/token"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rfc7638(jwk: dict) -> str:
    """The RFC 7638 SHA-256 thumbprint, computed here independently of the service."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    text = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return b64(hashlib.sha256(text.encode()).digest())


def make_key(alg: str):
    if alg.startswith("ES"):
        return ec.generate_private_key({"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(),
                                        "ES512": ec.SECP521R1()}[alg])
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Prover:
    """A client's DPoP key and the proofs it signs."""

    def __init__(self, alg: str = "ES256"):
        self.alg = alg
        self.key = make_key(alg)
        self.jwk = json.loads(jwt.get_algorithm_by_name(alg).to_jwk(self.key.public_key()))
        self.jkt = rfc7638(self.jwk)

    def proof(self, htu=TOKEN_ENDPOINT, htm="POST", iat=None, jti=None, nonce=None, typ="dpop+jwt", alg=None,
              jwk=None, key=None, ath=None, **claims) -> str:
        """A proof for POST /token; any argument changes it ("drop" leaves that header or claim out)."""
        header = {"typ": typ, "alg": self.alg if alg is None else alg, "jwk": self.jwk if jwk is None else jwk}
        body = {"jti": jti or uuid.uuid4().hex, "htm": htm, "htu": htu,
                "iat": int(time.time()) if iat is None else iat}
        if nonce is not None:
            body["nonce"] = nonce
        if ath is not None:
            body["ath"] = ath
        body.update(claims)
        header = {k: v for k, v in header.items() if v != "drop"}
        body = {k: v for k, v in body.items() if v != "drop"}
        if header.get("alg") in ("HS256", "HS384", "HS512"):
            return jwt.encode(body, key or b"k" * 32, algorithm=alg, headers=header)
        signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(body).encode())
        algorithm = jwt.get_algorithm_by_name(self.alg)  # whatever the header claims
        signature = algorithm.sign(signing_input.encode(), key or self.key)
        return signing_input + "." + b64(signature)


def unsigned(header: dict, claims: dict, signature: bytes = b"") -> str:
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode()) + "." + b64(signature)


def ath(token: str) -> str:
    """RFC 9449 §4.2 ath: base64url SHA-256 of the access token."""
    return b64(hashlib.sha256(token.encode()).digest())
