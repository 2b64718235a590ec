"""Validate the presented subject and actor tokens -> one ``Presented`` context.

Contract rules 1, 2 and 4: every token valid and from a registered issuer;
subject and actor from one issuer naming one ``sub``; ``may_act`` honoured.
The patient and its source come only from signed or introspected data.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from . import jose, policy, scopes, urns
from .config import IssuerCfg
from .errors import InvalidRequest
from .issuers import ACCESS_TOKEN_TYPES, IssuerUnavailable, UnknownKey, introspect

# Claims only an ID token carries (OIDC Core §2, §3.1.3.6): an access token has none.
_ID_TOKEN_ONLY = ("nonce", "at_hash", "c_hash", "s_hash")


@dataclass
class Presented:
    issuer: IssuerCfg
    subject_type: str
    sub: str | None
    claims: dict  # the subject token's claims (or introspection response)
    id_claims: dict | None  # the ID token's claims, whichever slot it came in
    token_scopes: scopes.ScopeSet | None  # None in the OpenID form
    patient: str | None
    source: str | None
    fhir_user: str | None
    expires: int  # the earliest exp of the tokens presented
    opaque: bool = False
    audit: dict = field(default_factory=dict)
    # The claims of the one token that supplied the patient (ID token, JWT access token,
    # introspection answer or grant): patient matching reads identifiers from it alone.
    patient_claims: dict | None = None


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts: a JWS (validated as one, even with an empty part)."""
    return token.count(".") == 2


class TokenValidator:
    def __init__(self, jwks_cache, upstream, settings):
        self.jwks = jwks_cache
        self.upstream = upstream
        self.settings = settings

    # -- one JWT ------------------------------------------------------------
    def verify_jwt(self, token: str, cfg, what: str, trusts=None, addressed_here: bool = False) -> tuple[object, dict]:
        """Signature, algorithm, iss, exp, nbf, iat (rule 1) -> (IssuerCfg, claims).
        The token is decoded once (jose.parse). With ``trusts`` (the client's), an
        issuer none of them names is refused before its keys are fetched: a client
        cannot make the service fetch keys it would not use. Unless ``addressed_here``
        (a JWT authorization grant), a token addressed to this service is refused: the
        subject and actor tokens are for FHIR servers and apps, never for us."""
        try:
            parsed = jose.parse(token)
        except jose.MalformedToken:
            raise InvalidRequest(f"The {what} is not a well-formed JWT.") from None
        header, claims = parsed.header, parsed.claims
        if not addressed_here:
            typ = header.get("typ")
            if isinstance(typ, str) and typ.lower() in urns.JAG_TYPES:
                raise InvalidRequest(f"The {what} is a JWT authorization grant (typ oauth-id-jag+jwt); present "
                                     f"it with grant_type {urns.JWT_BEARER} and assertion.")
            if any(self.settings.names_service(a) for a in jose.audiences(claims)):
                raise InvalidRequest(f"The {what} is addressed to this service (its aud names it); a subject or "
                                     "actor token is one the EHR issued for a FHIR server or for the app.")
        iss = claims.get("iss")
        issuer = cfg.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidRequest(f"The {what} was not issued by a trusted issuer; "
                                 "its iss must equal a registered issuer URL exactly.")
        if trusts is not None:
            # Contract order: the trust for this issuer is checked after the tokens,
            # with the same error (invalid_request); here it is checked first, from
            # the still unverified iss, so no key is fetched for an untrusted issuer.
            policy.check_issuer_named(trusts, iss, what)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in issuer.algs or alg not in jose.ASYMMETRIC_ALGS:
            raise InvalidRequest(f"The {what} is signed with an algorithm this issuer is not allowed to use.")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidRequest(f"The {what} has a malformed kid header.")
        try:
            key = self.jwks.key_for(issuer.jwks_uri, kid, alg)
        except UnknownKey:
            raise InvalidRequest(f"The {what} is signed with a key its issuer does not publish.") from None
        except IssuerUnavailable:
            raise InvalidRequest(f"The {what}'s issuer keys could not be fetched; try again later.") from None
        if not jose.verify_signature(parsed, alg, key.key):
            raise InvalidRequest(f"The {what}'s signature does not verify.")
        failed = jose.check_times(claims, time.time(), jose.CLOCK_LEEWAY)
        if failed == "exp":
            raise InvalidRequest(f"The {what} lacks a valid exp claim.")
        if failed == "expired":
            raise InvalidRequest(f"The {what} has expired.")
        if failed:
            raise InvalidRequest(f"The {what} is not yet valid (nbf or iat in the future).")
        if "sub" in claims and not isinstance(claims["sub"], str):
            raise InvalidRequest(f"The {what} has a malformed sub claim.")
        return issuer, claims

    # -- the whole request ----------------------------------------------------
    def validate(self, req, cfg, client_id: str, target) -> Presented:
        trusts = cfg.trusts_by_client.get(client_id, ())
        if req.subject_token_type == urns.ID_TOKEN:
            issuer, claims = self.verify_jwt(req.subject_token, cfg, "subject_token (ID token)", trusts)
            _check_id_token_shape(claims, "subject_token")
            presented = Presented(issuer, req.subject_token_type, claims.get("sub"), claims, claims, None,
                                  None, None, jose.string_or_none(claims.get("fhirUser")), int(claims["exp"]))
        else:
            presented = self._access_token(req, cfg, client_id, target, trusts)
        _check_may_act(presented.claims, client_id)  # rule 4
        self.locate_patient(presented)
        return presented

    def _access_token(self, req, cfg, client_id, target, trusts) -> Presented:
        actor_issuer = actor = None
        if req.actor_token is not None:
            actor_issuer, actor = self.verify_jwt(req.actor_token, cfg, "actor_token (ID token)", trusts)
            _check_id_token_shape(actor, "actor_token")
        if looks_like_jwt(req.subject_token):
            issuer, claims = self.verify_jwt(req.subject_token, cfg, "subject_token", trusts)
            if any(c in claims for c in _ID_TOKEN_ONLY):
                raise InvalidRequest("The subject_token is an ID token; send it as actor_token, "
                                     "or as subject_token with subject_token_type id_token.")
            aud = jose.audiences(claims)
            opaque = False
        else:
            if req.subject_token_type == urns.JWT:
                raise InvalidRequest("subject_token_type jwt needs a JWT; this subject_token is opaque.")
            issuer = actor_issuer or self._introspecting_issuer(cfg, client_id, target)
            claims = self._introspect(issuer, req.subject_token)
            aud = jose.audiences(claims) if "aud" in claims else None
            opaque = True
        # Rule 1: a subject access token is meant for the issuer's FHIR servers.
        accepted = set(issuer.sources) | set(issuer.audiences)
        if aud is not None and not accepted.intersection(aud):
            if not opaque and not any(c in claims for c in ("scope", "scp", "client_id")):
                raise InvalidRequest("The subject_token looks like an ID token (no scope, no client_id, and its aud "
                                     "names no FHIR server): send the EHR access token as subject_token and the ID "
                                     "token as actor_token.")
            raise InvalidRequest("The subject_token is not an access token for a FHIR server this "
                                 "issuer vouches for (its aud names none of the registered sources).",
                                 detail=f"aud {aud[:5]!r}")
        # Rule 2: one issuer, one subject.
        if actor is not None:
            if actor_issuer.url != issuer.url:
                raise InvalidRequest("The subject_token and actor_token come from different issuers.")
            if "sub" in claims and "sub" in actor and claims["sub"] != actor["sub"]:
                raise InvalidRequest("The subject_token and actor_token name different subjects (sub).")
        token_scopes = _token_scopes(claims)
        exps = [int(c["exp"]) for c in (claims, actor) if c is not None and jose.is_number(c.get("exp"))]
        sub = claims.get("sub") if isinstance(claims.get("sub"), str) else (actor or {}).get("sub")
        fhir_user = jose.string_or_none((actor or {}).get("fhirUser"))
        return Presented(issuer, req.subject_token_type, sub, claims, actor, token_scopes, None, None,
                         fhir_user, min(exps) if exps else int(time.time()) + self.settings.token_ttl,
                         opaque=opaque)

    def _introspecting_issuer(self, cfg, client_id, target):
        """An opaque token carries no iss: the one issuer with introspection among this
        client's trusts for this target. Never send a token to more than one issuer."""
        candidates = {t.issuer for t in cfg.trusts_by_client.get(client_id, ())
                      if target is None or t.target_id == target.id}
        candidates = [cfg.issuers[u] for u in sorted(candidates) if cfg.issuers[u].introspection_endpoint]
        if len(candidates) != 1:
            raise InvalidRequest("The subject_token is opaque and its issuer cannot be chosen; "
                                 "send the EHR's ID token as actor_token.")
        return candidates[0]

    def _introspect(self, issuer, token: str) -> dict:
        if not issuer.introspection_endpoint:
            raise InvalidRequest("The subject_token is opaque and its issuer has no introspection "
                                 "endpoint registered; send a JWT access token.")
        try:
            body = introspect(self.upstream, issuer, token)
        except IssuerUnavailable:
            raise InvalidRequest("The subject_token could not be introspected at its issuer; try again later.") from None
        if body.get("active") is not True:
            raise InvalidRequest("The subject_token is not active at its issuer.")
        token_type = body.get("token_type")
        if token_type is not None and (not isinstance(token_type, str)
                                       or token_type.lower() not in ACCESS_TOKEN_TYPES):
            # RFC 7662 §2.2: a refresh token (or anything else) is not an access token.
            raise InvalidRequest("The subject_token is not an access token (its issuer's introspection "
                                 "names another token_type); send the EHR access token.")
        now = time.time()
        exp = body.get("exp")
        if exp is not None and (not jose.is_number(exp) or exp + jose.CLOCK_LEEWAY < now):
            raise InvalidRequest("The subject_token has expired.")
        if "iss" in body and body["iss"] != issuer.url:
            raise InvalidRequest("The subject_token's introspection names another issuer.")
        if any(self.settings.names_service(a) for a in jose.audiences(body)):
            raise InvalidRequest("The subject_token is addressed to this service (its introspection's aud names "
                                 "it); a subject token is one the EHR issued for a FHIR server.")
        if "sub" in body and not isinstance(body["sub"], str):
            raise InvalidRequest("The subject_token's introspection has a malformed sub.")
        body = dict(body)
        body.setdefault("iss", issuer.url)
        return body

    def locate_patient(self, p: Presented) -> None:
        """The patient and its source: ID token, else access token, else introspection.
        Each token's claims are read into (patient, source) first; where both tokens
        name a patient the ids must match, and where both carry a source so must
        the sources (contract, "Standards details")."""
        issuer = p.issuer
        id_patient, id_source = _patient_of(p.id_claims, issuer)
        at_patient, at_source = (None, None) if p.subject_type == urns.ID_TOKEN else _patient_of(p.claims, issuer)
        if id_patient is not None and at_patient is not None and id_patient != at_patient:
            raise InvalidRequest("The ID token and the access token name different patients.")
        if id_source is not None and at_source is not None and id_source != at_source:
            raise InvalidRequest("The ID token and the access token name different source FHIR servers; "
                                 "send tokens from one launch.")
        if id_patient is not None:
            patient, source = id_patient, id_source
        elif at_patient is not None:
            patient, source = at_patient, at_source
        else:
            patient, source = None, id_source if id_source is not None else at_source
        if source is not None and source not in issuer.sources:
            raise InvalidRequest("The token's source FHIR server is not one this issuer may vouch for.")
        if source is None and len(issuer.sources) == 1:
            source = issuer.sources[0]
        if source is None:
            patient = None  # several sources, none named: the patient is unknown
        p.patient, p.source = patient, source
        p.patient_claims = None if patient is None else p.id_claims if id_patient is not None else p.claims


def _patient_of(claims, issuer) -> tuple:
    """One token's (patient id, source) from the issuer's claim names, normalised
    (contract, "Standards details"): ``{source}/Patient/{id}`` with ``{source}`` one of
    the issuer's sources, ``Patient/{id}``, or ``{id}``. A token carries a source when
    it has a source claim or an absolute reference; the two must agree. Anything else
    (another base, ``_history``, a query, a fragment) is refused."""
    if not claims:
        return None, None
    raw = _claim(claims, issuer.patient_claim, "patient")
    source = _claim(claims, issuer.source_claim, "source")
    if raw is None:
        return None, source
    if "://" in raw:
        base, sep, pid = raw.rpartition("/Patient/")
        if not sep or base not in issuer.sources:
            raise InvalidRequest("The token's patient is an absolute reference outside the FHIR servers this "
                                 "issuer may vouch for; use {source}/Patient/{id} with a registered source.")
        if source is not None and source != base:
            raise InvalidRequest("The token's patient reference and its source claim name different FHIR servers.")
        source = base
    elif raw.startswith("Patient/"):
        pid = raw[len("Patient/"):]
    else:
        pid = raw
    if not pid or not _PATIENT_ID.match(pid):
        raise InvalidRequest("The token's patient claim is not a patient id or a Patient reference "
                             "({source}/Patient/{id}, Patient/{id} or {id}; no history, query or fragment).")
    return pid, source


_PATIENT_ID = re.compile(r"[^/?#\s\x00-\x1f\x7f]{1,255}\Z")


class MalformedScopeClaim(ValueError):
    """A scope claim that is neither a string nor an array of strings."""


def scope_claim(claims: dict, names=("scope", "scp"), arrays: bool = True) -> scopes.ScopeSet | None:
    """The scopes a presented token or grant claims, for every grant alike: RFC 8693 §4.2
    and RFC 9068 §2.2.3 make it a space-separated string (some EHRs send an array of
    strings, as ``scp``: ``arrays``); None when the claim is absent. Within the claim budget
    (scopes.ScopeBudgetError); anything else is MalformedScopeClaim, never read as absent,
    so a grant can never come out wider than what it claims (rule 6)."""
    raw = next((claims[n] for n in names if claims.get(n) is not None), None)
    if raw is None:
        return None
    if isinstance(raw, list) and arrays:
        if len(raw) > scopes.MAX_CLAIMED_SCOPES:
            raise scopes.ScopeBudgetError("too many scopes")
        if not all(isinstance(s, str) for s in raw):
            raise MalformedScopeClaim("an array with a member that is not a string")
        raw = " ".join(raw)
    if not isinstance(raw, str):
        raise MalformedScopeClaim(f"a JSON {type(raw).__name__}, not a string")
    return scopes.parse_claim(raw)


def _token_scopes(claims: dict) -> scopes.ScopeSet:
    """An access token's (or introspection answer's) scopes: none claimed is none granted."""
    try:
        found = scope_claim(claims)
    except scopes.ScopeBudgetError:
        raise InvalidRequest(_TOO_MANY_SCOPES) from None
    except MalformedScopeClaim as e:
        raise InvalidRequest("The subject_token's scope claim is malformed: it must be a space-separated string "
                             "(or an array of strings).", detail=str(e)) from None
    return found if found is not None else scopes.parse_claim("")


_TOO_MANY_SCOPES = (f"The subject_token's scope claim is over this service's budget (at most "
                    f"{scopes.MAX_CLAIMED_SCOPES} scopes, {scopes.MAX_SCOPE_TEXT} characters); "
                    "ask the EHR for a token with fewer scopes.")


def _check_id_token_shape(claims: dict, slot: str) -> None:
    """OIDC Core §2: an ID token has aud and sub; RFC 9068 access-token claims
    (scope, client_id) mark an access token."""
    if "aud" not in claims or "sub" not in claims:
        raise InvalidRequest(f"The {slot} is not an ID token (it needs aud and sub).")
    if any(c in claims for c in ("scope", "scp", "client_id")):
        raise InvalidRequest(f"The {slot} is an access token, not an ID token.")


def _check_may_act(claims: dict, client_id: str) -> None:
    """Rule 4 (RFC 8693 §4.4): may_act names who may act; never ignored."""
    if "may_act" not in claims:
        return
    may_act = claims["may_act"]
    if not isinstance(may_act, dict) or client_id not in (may_act.get("client_id"), may_act.get("sub")):
        raise InvalidRequest("The subject_token's may_act does not name this client.")


def _claim(claims, name, what):
    if not claims or name not in claims or claims[name] is None:
        return None
    value = claims[name]
    if not isinstance(value, str) or not value or len(value) > 255:
        raise InvalidRequest(f"The token's {what} claim is malformed.")
    return value

