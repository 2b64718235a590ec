"""Trust, upstream client, scope and lifetime decisions: pure over their inputs."""
from __future__ import annotations

from . import scopes, urns
from .errors import InvalidRequest, InvalidScope, InvalidTarget
from .jose import audiences


def check_issuer_named(trusts, iss: str, what: str) -> None:
    """Before any key of an issuer is fetched: one of the client's trusts names it (a
    client cannot make the service fetch keys it would not use)."""
    if not any(t.issuer == iss for t in trusts):
        raise InvalidRequest(f"This client is not trusted to exchange tokens from the issuer of the {what}; "
                             "send tokens from an issuer its trusts name, or ask an administrator for a trust.")


def find_trust(cfg, client_id: str, issuer_url: str, target):
    """Contract order: a trust for this issuer (else invalid_request), then for this
    target (else invalid_target)."""
    trusts = cfg.trusts_by_client.get(client_id, ())
    if not any(t.issuer == issuer_url for t in trusts):
        raise InvalidRequest("This client is not trusted to exchange tokens from this issuer.")
    trust = cfg.trusts.get((client_id, issuer_url, target.id))
    if trust is None:
        raise InvalidTarget("This client may not obtain tokens for this target from this issuer.")
    return trust


def check_upstream(presented, trust) -> None:
    """Rule 3: the tokens were issued to the trust's upstream client, so a token
    stolen from another app cannot be exchanged."""
    up = trust.upstream_client_id
    if presented.subject_type != urns.ID_TOKEN:
        claims = presented.claims
        issued_to = claims.get("client_id", claims.get("azp"))
        if issued_to != up:
            raise InvalidRequest("The subject_token was issued to another client than the one this trust names.",
                                 detail=f"issued to {str(issued_to)[:100]!r}; the trust names {up!r}")
    ident = presented.id_claims
    if ident is not None:
        if up not in audiences(ident) or ("azp" in ident and ident["azp"] != up):
            raise InvalidRequest("The ID token was issued to another client than the one this trust names.",
                                 detail=f"ID token aud {audiences(ident)[:5]!r}, azp {str(ident.get('azp'))[:100]!r}; "
                                        f"the trust names {up!r}")


def allowed_form(presented, trust) -> None:
    if presented.subject_type == urns.ID_TOKEN and not trust.allow_id_token:
        raise InvalidRequest("This trust does not allow the OpenID exchange; "
                             "send the EHR access token as subject_token.")


def decide_scopes(requested: scopes.ScopeSet | None, presented, trust) -> scopes.ScopeSet:
    """Rule 6: requested ∩ the access token's scopes ∩ the trust's scopes, within
    the scope budget (a grant lists at most scopes.MAX_SCOPES)."""
    bounds = (trust.scopes,) if presented.token_scopes is None else (presented.token_scopes, trust.scopes)
    try:
        granted = scopes.downscope(requested, *bounds)
    except scopes.ScopeBudgetError as e:
        raise InvalidScope(str(e)) from None
    if not granted:
        raise InvalidScope("No scope is left after downscoping: request SMART resource scopes that "
                           "both the subject token and this client's trust allow.")
    return granted


def without_patient(granted: scopes.ScopeSet) -> scopes.ScopeSet:
    """Rule 7: no patient link, no patient scopes."""
    rest = granted.without_patient()
    if not rest:
        raise InvalidScope("patient/ scopes need a patient known to the target: the launch names "
                           "no patient, or no patient link maps it to this target.")
    return rest


def has_user(granted: scopes.ScopeSet) -> bool:
    """Whether a user/ scope is at stake (contract, "The user at the target")."""
    return any(s.context == "user" for s in granted.scopes)


def without_user(granted: scopes.ScopeSet) -> scopes.ScopeSet:
    """A mapped target and no user mapped onto it: no user/ scopes."""
    rest = scopes.ScopeSet(tuple(s for s in granted.scopes if s.context != "user"), granted.v1)
    if not rest:
        raise InvalidScope("user/ scopes need a user known to the target: the signed-in user is not known to "
                           "the target FHIR server (no user link maps them there, and no identifier matched "
                           "exactly one user).")
    return rest


def lifetime(ttl: int, trust, target, expires: int | None, now: int, consent_expires: int | None = None) -> int:
    """The smallest of the service TTL, the trust's and the target's caps, what
    remains of every presented token (None: nothing presented caps it), and what
    remains of the consent it is minted under (a token never outlives its consent)."""
    caps = [ttl] + [e - now for e in (expires, consent_expires) if e is not None]
    caps += [c for c in (trust.max_ttl, target.max_ttl) if c]
    life = min(caps)
    if life < 1:
        raise InvalidRequest("The presented token has expired.")
    return life
