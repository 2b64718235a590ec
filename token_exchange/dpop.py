"""Sender-constrained tokens: DPoP (RFC 9449), the one home of its rules.

- ``ProofChecker.check``: a DPoP proof at the token endpoint, every check of
  RFC 9449 §4.3 in its order but the last; the last (12, a ``jti`` used once) is
  the database's: the decision's audit record carries the proof's ``jti``, unique
  per proof key across every worker and instance (``AuditEvent.dpop_jti``), and it
  is committed before the answer, so a replayed proof's request records nothing,
  issues nothing and is refused (``Store.record_audit``; the pipeline). One insert
  per request, as without a proof, and no read.
- ``import_key``: the proof's public key and its RFC 7638 SHA-256 thumbprint,
  the ``cnf.jkt`` of a bound token (RFC 9449 §6.1).
- ``Nonces``: server nonces (RFC 9449 §8), derived, not stored: an HMAC over a
  one-minute window, keyed from the active signing key every instance loads
  from the database, so any instance accepts any other's nonces.
- ``check_bound``: a presented token that carries ``cnf`` is accepted only with
  a proof by the key it names (RFC 9449 §6, §7.1 applied to exchange).

The signature is verified with PyJWT's algorithm objects (jose.verify_signature,
as for every other JWS here); the key is imported and thumbprinted with joserfc
(Authlib's own JOSE library: ``JWKRegistry.import_key(...).thumbprint()``).
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import re
import time
from urllib.parse import urlsplit

from joserfc.jwk import JWKRegistry

from . import jose
from .errors import Detailed, InvalidRequest, OAuth2Error

# RFC 9449 §5.1 dpop_signing_alg_values_supported: asymmetric only (never none, never HMAC).
ALGS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA")
_KTY = {"ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"), "EdDSA": ("OKP", None)}
_PRIVATE = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")  # RFC 7517/7518 private members
MAX_PROOF = 8 * 1024  # characters of one DPoP header
MAX_RSA_BITS, MIN_RSA_BITS = 4096, 2048  # a bounded verification cost per request
IAT_WINDOW = 60  # seconds either way (RFC 9449 §11.1: a short window)
NONCE_WINDOW, NONCE_WINDOWS = 60, 5  # a nonce is good for the window it was issued in and the next 5 minutes
MAX_JTI = 255


class InvalidDPoPProof(Detailed, OAuth2Error):
    """RFC 9449 §5: the DPoP proof is missing where needed, malformed or invalid."""
    error = "invalid_dpop_proof"
    status_code = 400


class UseDPoPNonce(Detailed, OAuth2Error):
    """RFC 9449 §8: the proof must carry a nonce this server issued (the answer carries
    a fresh one in DPoP-Nonce)."""
    error = "use_dpop_nonce"
    status_code = 400


# -- RFC 3986 §6.2.2-6.2.3 normalisation of htu -------------------------------------------------
_UNRESERVED = re.compile(r"%([0-9A-Fa-f]{2})")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _pct(match):
    c = chr(int(match.group(1), 16))
    return c if c.isascii() and (c.isalnum() or c in "-._~") else "%" + match.group(1).upper()


def _dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 remove_dot_segments."""
    out = []
    for seg in path.split("/")[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    if path.split("/")[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)


def normalize_url(url: str) -> str | None:
    """The URL without query and fragment, after RFC 3986 §6.2.2 (case, percent-encoding,
    dot segments) and §6.2.3 (default port, empty path) normalisation; None when it is
    not an absolute http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if parts.username is not None or parts.password is not None:
        return None
    path = _UNRESERVED.sub(_pct, parts.path or "/")
    return f"{scheme}://{netloc}{_dot_segments(path) if path.startswith('/') else '/' + path}"


# -- keys and thumbprints ------------------------------------------------------------------------
class BadKey(ValueError):
    """The proof's jwk is not a usable public key for its alg (the reason, never the key)."""


_MEMBERS = ("kty", "crv", "x", "y", "n", "e")  # the public members of EC, OKP and RSA keys (RFC 7518, 8037)


def import_key(jwk: dict, alg: str) -> tuple:
    """(the public key for PyJWT's verify, its RFC 7638 thumbprint) of a proof's jwk,
    checked fit for ``alg``; BadKey otherwise. Only the public members are read (the
    thumbprint is made of them, RFC 7638 §3.2), and a key is imported once: a client
    signs every proof with one key."""
    members = tuple(jwk.get(m) for m in _MEMBERS)
    if not all(v is None or (isinstance(v, str) and len(v) <= 1024) for v in members):
        raise BadKey("jwk members must be strings")
    return _import(members, alg)


@functools.lru_cache(maxsize=2048)
def _import(members: tuple, alg: str) -> tuple:
    """import_key's work, cached (joserfc: JWKRegistry.import_key(...).thumbprint())."""
    jwk = {m: v for m, v in zip(_MEMBERS, members) if v is not None}
    kty, crv = _KTY.get(alg, ("RSA", None))
    if jwk.get("kty") != kty:
        raise BadKey(f"jwk kty {str(jwk.get('kty'))[:10]!r} cannot verify {alg}")
    if crv is not None and jwk.get("crv") != crv:
        raise BadKey(f"jwk crv {str(jwk.get('crv'))[:10]!r} is not {crv} ({alg})")
    if alg == "EdDSA" and jwk.get("crv") not in ("Ed25519", "Ed448"):
        raise BadKey("an EdDSA jwk's crv must be Ed25519 or Ed448")
    if kty == "RSA":
        try:
            bits = len(jose.b64url_decode(jwk.get("n") or "")) * 8
        except jose.MalformedToken:
            raise BadKey("an RSA jwk whose n is not base64url") from None
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise BadKey(f"an RSA jwk of {bits} bits (use {MIN_RSA_BITS} to {MAX_RSA_BITS})")
    try:
        key = JWKRegistry.import_key(jwk)
    except Exception as e:  # noqa: BLE001 - untrusted input: any failure to import is a malformed key
        raise BadKey(f"jwk not importable ({type(e).__name__})") from None
    if key.is_private:
        raise BadKey("jwk carries a private key")
    return key.public_key, key.thumbprint()


# -- server nonces (RFC 9449 §8) -----------------------------------------------------------------
class Nonces:
    """Nonces derived, not stored: HMAC-SHA256 of the window number under a key derived
    from the active signing key (every instance loads it from the database), so any
    instance accepts any other's, with no row per nonce. A nonce is accepted during
    its window and the NONCE_WINDOWS after it (five minutes). A key rotation makes the
    nonces of the old key stale: the client is answered use_dpop_nonce with a fresh one
    and retries, as RFC 9449 §8 expects of any nonce."""

    def __init__(self, config):
        self.config = config  # () -> the trust snapshot (its active key)

    def _key(self) -> bytes | None:
        active = self.config().active_key
        return active.derived_secret(b"dpop-nonce") if active is not None else None

    @staticmethod
    def _nonce(key: bytes, window: int) -> str:
        mac = hmac.new(key, window.to_bytes(8, "big"), hashlib.sha256).digest()[:18]
        return str(window) + "." + jose.b64url_encode(mac)

    def current(self) -> str | None:
        """The nonce every /token answer carries now (None while no key is active)."""
        return self.of_window(int(time.time()) // NONCE_WINDOW)

    def of_window(self, window: int) -> str | None:
        """The nonce of a one-minute window (epoch seconds // NONCE_WINDOW)."""
        key = self._key()
        return None if key is None else self._nonce(key, window)

    def valid(self, nonce) -> bool:
        if not isinstance(nonce, str) or len(nonce) > 64 or "." not in nonce:
            return False
        window = nonce.partition(".")[0]
        now = int(time.time()) // NONCE_WINDOW
        if not window.isascii() or not window.isdigit() or not now - NONCE_WINDOWS <= int(window) <= now:
            return False
        key = self._key()
        return key is not None and hmac.compare_digest(nonce.encode(), self._nonce(key, int(window)).encode())


# -- the proof (RFC 9449 §4.3) -------------------------------------------------------------------
REPLAYED = "The DPoP proof was already used; make a new proof for each request."


def replayed() -> InvalidDPoPProof:
    """(12): the request's audit record found the proof's jti spent by an earlier request."""
    return InvalidDPoPProof(REPLAYED, detail="the proof's jti was spent by an earlier request")


class Proof:
    """A checked proof: its key's thumbprint (jkt) and its jti, which the decision's audit
    record spends (AuditEvent.dpop_jkt, dpop_jti)."""
    __slots__ = ("jkt", "jti")

    def __init__(self, jkt: str, jti: str):
        self.jkt, self.jti = jkt, jti


class ProofChecker:
    """RFC 9449 §4.3 at the token endpoint -> the checked Proof."""

    def __init__(self, settings, nonces: Nonces):
        self.settings, self.nonces = settings, nonces
        self.htu = normalize_url(settings.token_endpoint)  # behind a proxy: what discovery publishes

    def check(self, header: str) -> Proof:
        """The one DPoP header's proof, checked; raises InvalidDPoPProof (or UseDPoPNonce)
        saying which check failed. Its jti is spent by the decision's audit record (12)."""
        # §4.3 (1): exactly one DPoP header. Servers join repeated headers with ",", which a
        # compact JWS never contains.
        if "," in header:
            raise InvalidDPoPProof("Send exactly one DPoP header.")
        if len(header) > MAX_PROOF:
            raise InvalidDPoPProof("The DPoP proof is too long.")
        try:  # (2) a well-formed JWT
            parsed = jose.parse(header.strip())
        except jose.MalformedToken:
            raise InvalidDPoPProof("The DPoP proof is not a well-formed JWT.") from None
        h, claims = parsed.header, parsed.claims
        typ = h.get("typ")  # (4) typ dpop+jwt
        if not isinstance(typ, str) or typ.lower() != "dpop+jwt":
            raise InvalidDPoPProof("The DPoP proof's typ header must be dpop+jwt.")
        alg = h.get("alg")  # (5) an asymmetric algorithm this server supports
        if not isinstance(alg, str) or alg not in ALGS:
            raise InvalidDPoPProof("The DPoP proof's alg must be one of " + ", ".join(ALGS) + ".")
        jwk = h.get("jwk")  # (7) a public key, no private member
        if not isinstance(jwk, dict):
            raise InvalidDPoPProof("The DPoP proof's header must carry its public key as jwk.")
        if any(m in jwk for m in _PRIVATE):
            raise InvalidDPoPProof("The DPoP proof's jwk must be a public key (it has a private member).")
        try:
            key, jkt = import_key(jwk, alg)
        except BadKey as e:
            raise InvalidDPoPProof("The DPoP proof's jwk is not a usable public key for its alg.",
                                   detail=str(e)) from None
        if not jose.verify_signature(parsed, alg, key):  # (6) the signature, by that key
            raise InvalidDPoPProof("The DPoP proof's signature does not verify with its jwk.")
        self._claims(claims)
        if self.settings.dpop_nonce and not self.nonces.valid(claims.get("nonce")):  # (10), RFC 9449 §8
            raise UseDPoPNonce("Send a DPoP proof with the nonce from the DPoP-Nonce header.")
        # (12) jti: single use, across every worker and instance: the decision's audit record
        # spends it (the pipeline refuses a request whose record finds it spent).
        return Proof(jkt, claims["jti"])

    def _claims(self, claims: dict) -> None:
        jti = claims.get("jti")  # (3) the required claims
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI:
            raise InvalidDPoPProof("The DPoP proof's jti must be a non-empty string of at most 255 characters.")
        if claims.get("htm") != "POST":  # (8) htm: the request's method
            raise InvalidDPoPProof("The DPoP proof's htm must be POST.")
        htu = claims.get("htu")  # (9) htu: this endpoint's URL, without query and fragment
        if not isinstance(htu, str) or len(htu) > 2048 or (htu != self.settings.token_endpoint
                                                           and normalize_url(htu) != self.htu):
            raise InvalidDPoPProof(f"The DPoP proof's htu must be the token endpoint, {self.settings.token_endpoint}.")
        iat = claims.get("iat")  # (11) iat within the window, either way
        if not jose.is_number(iat):
            raise InvalidDPoPProof("The DPoP proof's iat must be a number.")
        if abs(iat - time.time()) > IAT_WINDOW:
            raise InvalidDPoPProof("The DPoP proof's iat is not within 60 seconds of now; check the clock and "
                                   "make a fresh proof.")


# -- bound inputs (RFC 9449 §6) ------------------------------------------------------------------
def check_bound(tokens, jkt: str | None, grant_error=InvalidRequest, proof_checked: bool = True) -> str | None:
    """``tokens``: (what, claims) of each presented token (its JWT claims or its issuer's
    introspection answer). A token carrying ``cnf.jkt`` is accepted only with a proof by
    that key (else ``grant_error``); a ``cnf`` of another kind is refused: the service
    cannot check it. ``proof_checked`` False (`explain`, which sends no proof): the
    kinds of binding are checked, not the key. -> the jkt the tokens are bound to, or None."""
    bound = None
    for what, claims in tokens:
        if not claims or "cnf" not in claims:
            continue
        cnf = claims["cnf"]
        want = cnf.get("jkt") if isinstance(cnf, dict) else None
        if not isinstance(want, str) or not want:
            raise InvalidRequest(f"The {what} is bound to a key in a way this service cannot check (its cnf has "
                                 "no jkt); only DPoP-bound (cnf.jkt) tokens can be exchanged.")
        if not proof_checked:
            bound = want
            continue
        if jkt is None:
            raise grant_error(f"The {what} is bound to a DPoP key (cnf.jkt): send a DPoP proof signed with that key.")
        if not hmac.compare_digest(want.encode(), jkt.encode()):
            raise grant_error(f"The {what} is bound to another DPoP key than the proof's (cnf.jkt).",
                              detail=f"cnf.jkt {want[:64]!r}; the proof's key {jkt}")
        bound = want
    return bound
