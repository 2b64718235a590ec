"""Secrets at rest: sealing outbound secrets and private keys, hashing inbound secrets.

With TOKEN_EXCHANGE_KEY_SECRET set, sealed values are AES-GCM encrypted under a
key derived from it (HKDF-SHA256) and client-secret hashes are peppered with it.
Inbound client secrets are high-entropy (>= 32 characters), so a salted
HMAC-SHA256 is the right hash: a password KDF per request would cap the service
at a few exchanges per second without adding strength.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_SECRET_LENGTH = 32  # characters of a client or target secret given to the CLI

SEALED_PREFIX = "sealed:v1:"


class SealError(ValueError):
    pass


@functools.lru_cache(maxsize=8)  # a pure function of its inputs: derived once, not per request
def _derive(key_secret: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"token-exchange", info=purpose).derive(
        key_secret.encode())


def seal(value: str, key_secret: str | None) -> str:
    if not key_secret:
        return value
    nonce = os.urandom(12)
    ct = AESGCM(_derive(key_secret, b"seal")).encrypt(nonce, value.encode(), None)
    return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + ct).decode()


def unseal(value: str, key_secret: str | None) -> str:
    if not value.startswith(SEALED_PREFIX):
        return value
    if not key_secret:
        raise SealError("a stored secret is encrypted: set TOKEN_EXCHANGE_KEY_SECRET")
    raw = base64.urlsafe_b64decode(value[len(SEALED_PREFIX):])
    try:
        return AESGCM(_derive(key_secret, b"seal")).decrypt(raw[:12], raw[12:], None).decode()
    except Exception:
        raise SealError("a stored secret cannot be decrypted: is TOKEN_EXCHANGE_KEY_SECRET the one it was sealed with?") from None


def opens(value: str, key_secret: str | None) -> bool:
    """Whether ``value`` unseals under ``key_secret`` (a value stored unsealed always does)."""
    try:
        unseal(value, key_secret)
    except (SealError, ValueError):  # ValueError: not base64 at all
        return False
    return True


def hash_secret(secret: str, key_secret: str | None, salt: str | None = None) -> tuple[str, str]:
    """-> (salt, hex digest) of HMAC-SHA256(salt [+ pepper], secret)."""
    salt = salt or secrets.token_hex(16)
    key = salt.encode() + (_derive(key_secret, b"pepper") if key_secret else b"")
    return salt, hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()


def check_secret(secret: str, salt: str | None, digest: str | None, key_secret: str | None) -> bool:
    if not salt or not digest:
        return False
    return hmac.compare_digest(hash_secret(secret, key_secret, salt)[1], digest)


def generate_secret() -> str:
    return secrets.token_urlsafe(32)  # 43 characters, 256 bits
