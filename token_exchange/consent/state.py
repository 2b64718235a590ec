"""A sign-in at the EHR between its start and the EHR's answer, carried by the browser.

Starting a sign-in (Continue on a ticket's page, Sign in at /consent) needs no
account, so it stores nothing on the server: what the callback needs (the
OpenID Connect state, nonce and PKCE verifier, the EHR, and for a ticket its
hash, the app's redirect URI and state) is sealed into the flow's cookie with
AES-256-GCM (encrypted and integrity-protected; the cookie's purpose is the
associated data), and lapses after ``SIGNIN_TTL``. A session is stored only at
the callback, once the EHR's answer is verified, together with a marker that
spends the state (``spent_key``), so a replayed callback is refused at every
instance.

The cookie key is shared through the database every instance uses: a random
256-bit key per day (``browser_session`` row ``signin-key:<day>:<fingerprint of
TOKEN_EXCHANGE_KEY_SECRET>``, sealed at rest with that secret when it is set, kept
two days). Cookies are sealed with today's key and opened with the key they name,
today's or yesterday's. A new TOKEN_EXCHANGE_KEY_SECRET makes a new key at once
(the sign-ins under way then are refused and started again).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..sealing import SealError, seal, unseal
from .service import digest
from .signin import SignInError

log = logging.getLogger(__name__)

SIGNIN_TTL = 600  # seconds from the start of a sign-in to the EHR's answer
MAX_COOKIE = 3500  # characters of a sealed cookie (browsers keep at least 4096 bytes a cookie)
KEY_PERIOD = 86400  # seconds a cookie key seals new cookies


class SignInStates:
    """Seal, open and spend (once) the sign-in state of the consent pages' cookies."""

    def __init__(self, records, key_secret: str | None):
        self.records, self.key_secret = records, key_secret
        # Which TOKEN_EXCHANGE_KEY_SECRET seals the key: no more than the sealed values stored already reveal.
        self._sealed_by = hashlib.sha256(b"signin-key\0" + key_secret.encode()).hexdigest()[:16] \
            if key_secret else "none"
        self._keys: dict[int, AESGCM] = {}  # day -> its key, once read (at most a few)

    def seal(self, purpose: str, data: dict, expires: int) -> str:
        """The cookie value carrying ``data`` for ``purpose`` ("grant" or "manage") until
        ``expires`` (epoch seconds, at most SIGNIN_TTL ahead); SignInError when it would
        be too long for a cookie or the key cannot be read."""
        now = int(time.time())
        day = now // KEY_PERIOD
        body = json.dumps(dict(data, exp=min(expires, now + SIGNIN_TTL)), separators=(",", ":")).encode()
        nonce = os.urandom(12)
        key = self._key(day, create=True)
        if key is None:
            raise SignInError(503, "Sign-in is not available just now; ask the service's administrator.",
                              "the sign-in cookie key cannot be read")
        value = f"{day}.{base64.urlsafe_b64encode(nonce + key.encrypt(nonce, body, purpose.encode())).decode()}"
        if len(value) > MAX_COOKIE:
            raise SignInError(400, "The app's return address and state are too long; tell the app's maker.",
                              f"sealed sign-in cookie of {len(value)} characters")
        return value.rstrip("=")

    def open(self, purpose: str, value: str | None) -> dict | None:
        """The data sealed for ``purpose``, or None: no such cookie, altered, sealed for
        another purpose, with an unknown key, or lapsed."""
        if not value or len(value) > MAX_COOKIE or "." not in value:
            return None
        day, _, text = value.partition(".")
        if not day.isascii() or not day.isdigit() or int(day) not in (int(time.time()) // KEY_PERIOD + d
                                                                       for d in (0, -1)):
            return None
        try:
            raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
            key = self._key(int(day), create=False)
            data = json.loads(key.decrypt(raw[:12], raw[12:], purpose.encode())) if key and len(raw) > 28 else None
        except (binascii.Error, ValueError, InvalidTag):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("exp"), int) or data["exp"] <= time.time():
            return None
        return data

    def find(self, state, cookies) -> tuple[str, str, dict] | None:
        """(purpose, cookie, data) of the sealed sign-in among ``cookies`` ((purpose,
        value) pairs) whose OIDC state is ``state``, or None."""
        for purpose, cookie in cookies:
            data = self.open(purpose, cookie)
            if data and isinstance(state, str) and state and hmac.compare_digest(
                    state.encode(), str(data["signin"]["state"]).encode()):
                return purpose, cookie, data
        return None

    def spent(self, data: dict) -> bool:
        return self.records.signin_spent(self._spent_key(data))

    def complete(self, cookie: str, data: dict, session: dict, expires: int, ticket_hash: str | None) -> str | None:
        """The EHR's answer verified: spend the state, store ``session`` until ``expires``
        (a ticket's binding moves from the sign-in cookie to it); the new session cookie,
        or None when the state was spent meanwhile or the ticket is gone."""
        new_cookie = secrets.token_urlsafe(32)
        if not self.records.complete_signin(self._spent_key(data), data["exp"], digest(new_cookie), session,
                                            expires, ticket_hash=ticket_hash, old_hash=digest(cookie)):
            return None
        return new_cookie

    @staticmethod
    def _spent_key(data: dict) -> str:
        """The key of the marker that spends this sign-in's state (``browser_session``)."""
        return digest("signin-state:" + data["signin"]["state"])

    def _key(self, day: int, create: bool) -> AESGCM | None:
        key = self._keys.get(day)
        if key is not None:
            return key
        name = f"signin-key:{day}:{self._sealed_by}"
        stored = self.records.browser_key(name)
        if stored is None and create:
            fresh = seal(base64.b64encode(os.urandom(32)).decode(), self.key_secret)
            stored = self.records.add_browser_key(name, fresh, (day + 2) * KEY_PERIOD)
        if stored is None:
            return None
        try:
            key = AESGCM(base64.b64decode(unseal(stored, self.key_secret)))
        except (SealError, ValueError) as e:  # another TOKEN_EXCHANGE_KEY_SECRET than the one it was sealed with
            log.error("sign-in cookie key unreadable", extra={"reason": str(e)[:200]})
            return None
        self._keys = {d: k for d, k in self._keys.items() if d >= day - 1}
        self._keys[day] = key
        return key
