"""Compact JWS parsing and verification, each token decoded once.

PyJWT's decode validates base64 character by character in Python and parses a
token again for each question asked of it (header, unverified claims, verified
claims). Here a token is split and decoded once (the alphabet checked by one
regular expression, C speed) and its signature verified with PyJWT's own
algorithm objects, so the cryptography is PyJWT's; the claim checks follow
RFC 7519 §4.1 with the contract's leeway.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re

import jwt
from jwt.exceptions import InvalidKeyError

# Algorithms accepted from upstream issuers: asymmetric only (never none, never HMAC).
ASYMMETRIC_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
DEFAULT_ISSUER_ALGS = ("RS256", "RS384", "ES256", "ES384")
CLOCK_LEEWAY = 60  # seconds, on exp / nbf / iat

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*\Z")
_ALGORITHMS = jwt.algorithms.get_default_algorithms()


class MalformedToken(ValueError):
    pass


class Parsed:
    __slots__ = ("header", "claims", "signing_input", "signature")

    def __init__(self, header, claims, signing_input, signature):
        self.header, self.claims, self.signing_input, self.signature = header, claims, signing_input, signature


def b64url_decode(segment: str) -> bytes:
    if not _SEGMENT.match(segment) or len(segment) % 4 == 1:
        raise MalformedToken()
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise MalformedToken() from None


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse(token: str) -> Parsed:
    """Split and decode a compact JWS; no verification yet. Bounded: callers cap the
    token's length, and any JSON the decoder refuses is a MalformedToken."""
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedToken()
    try:
        header = _DECODER.decode(b64url_decode(parts[0]).decode("utf-8"))
        claims = _DECODER.decode(b64url_decode(parts[1]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError also covers integers of more digits than int() reads (4,300);
        # RecursionError, JSON nested deeper than the decoder follows.
        raise MalformedToken() from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise MalformedToken()
    if "crit" in header:  # RFC 7515 §4.1.11: no extensions are understood here
        raise MalformedToken()
    return Parsed(header, claims, (parts[0] + "." + parts[1]).encode(), b64url_decode(parts[2]))


def verify_signature(parsed: Parsed, alg: str, key) -> bool:
    algorithm = _ALGORITHMS.get(alg)
    if algorithm is None:
        return False
    try:
        return bool(algorithm.verify(parsed.signing_input, algorithm.prepare_key(key), parsed.signature))
    except (InvalidKeyError, TypeError, ValueError, AttributeError):
        return False  # a key of another type than the algorithm needs


def check_times(claims: dict, now: float, leeway: int) -> str | None:
    """RFC 7519 §4.1.4-6 -> None, or which check failed: 'exp', 'expired', 'nbf', 'iat'."""
    exp = claims.get("exp")
    if not is_number(exp):
        return "exp"
    if exp <= now - leeway:
        return "expired"
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if value is None:
            continue
        if not is_number(value) or value > now + leeway:
            return name
    return None


def is_number(v) -> bool:
    """A finite JSON number: not a bool, and not an integer beyond any float (math.isfinite
    would raise OverflowError on one of, say, 400 digits)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def audiences(claims: dict) -> list:
    """A token's aud as a list of strings (RFC 7519 §4.1.3: a string or an array)."""
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list):
        return [a for a in aud if isinstance(a, str)]
    return []


def string_or_none(v):
    """A claim's value when it is a string, else None."""
    return v if isinstance(v, str) else None


def no_constants(name):
    """RFC 8259 has no NaN or Infinity; Python's json would accept them."""
    raise ValueError(name)


_DECODER = json.JSONDecoder(parse_constant=no_constants)  # built once, not per token
