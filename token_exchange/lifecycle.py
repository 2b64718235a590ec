"""RFC 7662 introspection (for targets) and RFC 7009 revocation (for clients) of
the tokens this service minted."""
from __future__ import annotations

import time
from datetime import datetime, timezone

import jwt

from . import keys as keymod
from .client_auth import parse_basic
from .errors import InvalidClient, InvalidRequest, UnauthorizedClient
from .sealing import check_secret

INACTIVE = {"active": False}
_FIELDS = ("scope", "client_id", "sub", "aud", "iss", "exp", "iat", "jti", "patient")


def verify_minted(token: str, cfg, settings) -> dict | None:
    """Claims of a token this service minted and still publishes the key of; else None."""
    if not isinstance(token, str) or token.count(".") != 2:
        return None
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return None
    kid = header.get("kid")
    jwk = next((k for k in keymod.published(cfg.key_rows, settings.key_grace, twins=False)
                if isinstance(kid, str) and k.get("kid") == kid), None)
    if jwk is None or header.get("typ") != "at+jwt" or header.get("alg") != jwk.get("alg"):
        return None
    try:
        return jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=[jwk["alg"]], issuer=settings.issuer,
                          options={"verify_aud": False, "require": ["exp", "iat", "jti", "aud"]})
    except (jwt.PyJWTError, ValueError, TypeError):
        return None


def authenticate_target(request, cfg, key_secret):
    """Targets introspect with HTTP Basic: their registered name and secret."""
    header = request.headers.get("Authorization")
    if not header:
        raise InvalidClient("Introspection requires HTTP Basic with the target's name and secret.")
    name, password = parse_basic(header)
    target = cfg.targets_by_name.get(name)
    if target is None:
        raise InvalidClient("Target authentication failed.", detail="no target of that name")
    if not check_secret(password, target.secret_salt, target.secret_hash, key_secret):
        raise InvalidClient("Target authentication failed.", detail="wrong secret for the target")
    return target


def presented_name(request) -> str | None:
    """The name an introspection request authenticates as (for the log), or None."""
    try:
        return parse_basic(request.headers.get("Authorization") or "")[0]
    except InvalidClient:
        return None


def _presented_claims(form, cfg, settings) -> dict | None:
    """The `token` parameter (RFC 7662 §2.1, RFC 7009 §2.1), verified as one of ours."""
    token = form.get("token")
    if not token:
        raise InvalidRequest("The token parameter is required.")
    return verify_minted(token, cfg, settings)


def introspect(form, target, cfg, store, settings) -> dict:
    claims = _presented_claims(form, cfg, settings)
    # A token meant for another target is inactive to this one (RFC 7662 §2.2).
    if claims is None or claims.get("aud") != target.base_url or store.is_revoked(claims["jti"]):
        return dict(INACTIVE)
    # A token minted under a consent lives only while the consent does (contract,
    # "Consent for patient-facing apps": withdrawal revokes).
    if store.consents.lapsed(claims["jti"], datetime.now(timezone.utc)):
        return dict(INACTIVE)
    # `client disable` / `client remove`, and the rules of `token revoke` and of the
    # removals that revoke: loaded with the snapshot, so every instance sees a new one
    # within the reload interval (at once with Redis).
    client = cfg.clients.get(claims.get("client_id"))
    if client is None or client.disabled or cfg.revocations.covers(
            claims, lambda: store.token_origin(claims["jti"], claims["iat"])):
        return dict(INACTIVE)
    # RFC 9449 §6.2: a DPoP-bound token introspects with its cnf and token_type DPoP.
    out = {"active": True, "token_type": "DPoP" if "cnf" in claims else "Bearer"}
    out.update({k: claims[k] for k in _FIELDS if k in claims})
    for k in ("idp", "fhirUser", "act", "cnf"):
        if k in claims:
            out[k] = claims[k]
    return out


def revoke(form, client_id, cfg, store, settings, record: dict) -> None:
    """Revoke the presented token, naming it (its jti) in ``record``, the decision's
    audit record (a valid token of another client: named, and refused)."""
    claims = _presented_claims(form, cfg, settings)
    if claims is None or claims["exp"] < time.time():
        return  # RFC 7009 §2.2: invalid tokens need no action and get 200
    record["jti"] = claims["jti"]
    if claims.get("client_id") != client_id:
        raise UnauthorizedClient("This token was issued to another client; only that client may revoke it.")
    store.revoke(claims["jti"], int(claims["exp"]))
