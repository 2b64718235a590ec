"""The JWT authorization grant of identity and authorization chaining.

IETF draft *OAuth Identity and Authorization Chaining Across Domains*: the EHR's
authorization server turns the app's token into a short-lived JWT authorization
grant (header ``typ`` ``oauth-id-jag+jwt``) addressed to this service, and the app
presents it with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``
(RFC 7523 §2.1). The EHR's access token never leaves home.

Authlib's ``JWTBearerGrant`` treats the assertion's ``iss`` as the client; here
the client authenticates on its own (as for token exchange) and ``iss`` is a
trusted EHR, so this grant shares ``ExchangeGrant``'s steps instead: the same
target, trust, scopes, consent, patient mapping, minting and audit. What is its
own: the parameters, the assertion's checks (``invalid_grant``), the trust's
opt-in (``--allow-jwt-grant``), ``azp`` against the trust's upstream client, and
the single use of the assertion's ``jti``, spent just before minting.
"""
from __future__ import annotations

import hashlib
import time

from authlib.oauth2.rfc7523.jwt_bearer import JWT_BEARER_GRANT_TYPE

from .. import audit, jose, scopes, urns
from ..errors import InvalidGrant, InvalidRequest, UnauthorizedClient
from ..subject import MalformedScopeClaim, Presented, scope_claim
from .base import MAX_TOKEN_LENGTH, ExchangeGrant

MAX_LIFETIME = 300  # exp - iat, no leeway
# RFC 8693 parameters have no place in this grant.
EXCHANGE_ONLY = ("subject_token", "subject_token_type", "actor_token", "actor_token_type", "requested_token_type")


def replay_key(issuer_url: str) -> str:
    """The replay store is keyed (client, jti); a grant's jti is unique per issuer."""
    return "jag:" + hashlib.sha256(issuer_url.encode()).hexdigest()


class JWTAuthorizationGrant(ExchangeGrant):
    GRANT_TYPE = JWT_BEARER_GRANT_TYPE
    GRANT_NAME = "jwt-bearer"
    PARAMETERS = ("assertion", "scope")
    ISSUED_TOKEN_TYPE = None  # RFC 7523 answers as RFC 6749 §5.1: no issued_token_type
    BINDING_ERROR = InvalidGrant  # an assertion bound to another DPoP key (or with no proof) is invalid_grant
    STEPS = tuple(("assertion (invalid_grant)", m) if m == "check_presented" else (n, m)
                  for n, m in ExchangeGrant.STEPS)

    @classmethod
    def advertised(cls, cfg) -> bool:
        """Listed only while some trust allows it (--allow-jwt-grant)."""
        return cfg.any_jwt_grant_trust

    def parse_parameters(self, form):
        for name in EXCHANGE_ONLY:
            if name in form:
                raise InvalidRequest(f"{name} belongs to token exchange; the JWT authorization grant takes "
                                     "assertion, resource or audience, and scope.")
        assertion = form.get("assertion")
        if not assertion:
            raise InvalidRequest("The assertion parameter is required (the JWT authorization grant).")
        if len(assertion) > MAX_TOKEN_LENGTH:
            raise InvalidRequest("The assertion is too long.")
        self.request.assertion = assertion

    def validate_presented(self) -> Presented:
        client_id = self.client_id
        try:
            parsed = jose.parse(self.request.assertion)
        except jose.MalformedToken:
            raise InvalidGrant("The assertion is not a well-formed JWT.") from None
        header, claims = parsed.header, parsed.claims
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in urns.JAG_TYPES:
            raise InvalidGrant("The assertion's typ header must be oauth-id-jag+jwt (a JWT authorization grant).")
        try:  # signature by the registered issuer's key, algorithm, iss, exp, nbf, iat (rule 1)
            issuer, claims = self.deps.validator.verify_jwt(self.request.assertion, self.cfg, "assertion",
                                                              addressed_here=True)
        except InvalidRequest as e:
            raise InvalidGrant(e.description, detail=getattr(e, "detail", None)) from None
        self.audit["assertion_jti"] = audit.clip(claims.get("jti") if isinstance(claims.get("jti"), str) else None)
        self._check_claims(claims, client_id)
        if self.deps.replay.spent(replay_key(issuer.url), claims["jti"]):
            raise InvalidGrant("The assertion was already used; ask the EHR for a new one.")
        try:  # as a subject token's scope claim; absent: the assertion caps nothing
            token_scopes = scope_claim(claims, names=("scope",), arrays=False)  # RFC 8693 §4.2: a string
        except scopes.ScopeBudgetError:
            raise InvalidGrant(f"The assertion's scope claim is over this service's budget (at most "
                               f"{scopes.MAX_CLAIMED_SCOPES} scopes); ask the EHR for a grant with fewer "
                               "scopes.") from None
        except MalformedScopeClaim as e:
            raise InvalidGrant("The assertion's scope claim is malformed: it must be a space-separated string.",
                               detail=str(e)) from None
        presented = Presented(issuer, urns.JWT_BEARER, claims["sub"], claims, None, token_scopes, None, None,
                              jose.string_or_none(claims.get("fhirUser")), None)  # the assertion's exp caps nothing
        self.deps.validator.locate_patient(presented)
        return presented

    def _check_claims(self, claims: dict, client_id: str) -> None:
        """The claims a JWT authorization grant must carry, beyond rule 1."""
        s = self.settings
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) == 1:
            aud = aud[0]
        if not isinstance(aud, str) or aud not in (s.issuer, s.token_endpoint):
            raise InvalidGrant("The assertion's aud must be this service's issuer URL or token endpoint.")
        if "nonce" in claims or "at_hash" in claims:
            raise InvalidGrant("The assertion carries nonce or at_hash: it is an ID token, not a JWT "
                               "authorization grant.")
        for name in ("exp", "iat", "jti", "sub"):
            if name not in claims:
                raise InvalidGrant(f"The assertion has no {name} claim.")
        if not isinstance(claims["jti"], str) or not claims["jti"] or len(claims["jti"]) > 255:
            raise InvalidGrant("The assertion's jti must be a non-empty string of at most 255 characters.")
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise InvalidGrant("The assertion's sub must be a non-empty string.")
        if not jose.is_number(claims["iat"]):
            raise InvalidGrant("The assertion's iat must be a number.")
        if claims["exp"] - claims["iat"] > MAX_LIFETIME:
            raise InvalidGrant("The assertion lives longer than 5 minutes (exp - iat); ask the EHR for a "
                               "short-lived grant.")
        if claims["iat"] > time.time() + jose.CLOCK_LEEWAY:
            raise InvalidGrant("The assertion's iat is in the future.")
        if claims.get("client_id") != client_id:
            raise InvalidGrant("The assertion was issued for another client (its client_id is not this client's).")

    def bound_tokens(self):
        return [("assertion", self.presented.claims)]

    def check_allowed(self):
        if not self.trust.allow_jwt_grant:
            raise UnauthorizedClient("This trust does not allow the JWT authorization grant; an administrator "
                                     "can allow it with `trust update --allow-jwt-grant`.")
        return "the JWT authorization grant"

    def check_upstream(self):
        azp = self.presented.claims.get("azp")
        if azp is not None and azp != self.trust.upstream_client_id:
            raise InvalidRequest("The assertion's azp is not the upstream client this trust names.",
                                 detail=f"azp {str(azp)[:100]!r}; the trust names {self.trust.upstream_client_id!r}")
        return "azp absent" if azp is None else f"azp {azp}"

    def before_minting(self):
        """The jti is spent atomically, shared by every instance, just before minting: a
        refused request leaves it unspent; a replay racing this one loses here."""
        if self.dry_run:
            return
        claims = self.presented.claims
        exp = int(claims["exp"]) if jose.is_number(claims["exp"]) else int(time.time()) + MAX_LIFETIME
        if not self.deps.replay.spend(replay_key(self.presented.issuer.url), claims["jti"], exp):
            raise InvalidGrant("The assertion was already used; ask the EHR for a new one.")
