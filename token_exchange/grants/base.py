"""What every grant at /token shares, in Authlib's style: one ``BaseGrant`` per grant
type with a ``GRANT_TYPE`` constant, ``validate_token_request()`` then
``create_token_response()``, raising typed ``OAuth2Error``s.

Authlib ships no RFC 8693 grant. ``ExchangeGrant`` holds the steps every grant here
runs, named and in the contract's order (parameters, target, trust, the presented
tokens, upstream client, scopes, consent, patient, user), and the minting of the RFC 9068
token. A grant adds its own parameters and the validation of what it presents (the
EHR's tokens, or a JWT authorization grant).

Collaborators are handed in (``Collaborators``, wired once in ``create_app``), as
fosite's compose/ does: a grant never reaches back into the pipeline that runs it.
Mapping and consent take plain values and return results; the grant records them in
the decision's audit record. ``token-exchange explain`` runs the same steps with a
trace and ``dry_run`` (nothing searched, written or spent).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from authlib.oauth2.rfc6749.grants import BaseGrant, TokenEndpointMixin

from .. import audit, dpop, policy, scopes, urns
from ..errors import InvalidRequest, InvalidScope, InvalidTarget, TemporarilyUnavailable, UnauthorizedClient
from ..forms import reject_duplicates
from ..mapping.patients import MatchingUnavailable
from ..mapping.users import UserMappingUnavailable, source_user
from ..mapping.search import WOULD_SEARCH

MAX_TOKEN_LENGTH = 16 * 1024


@dataclass(frozen=True)
class Collaborators:
    """What a grant works with, wired once in ``create_app``."""
    settings: object
    config: Callable  # () -> config.Config, the current trust snapshot
    validator: object  # subject.TokenValidator: the presented tokens (rules 1, 2, 4)
    patients: object  # mapping.patients.PatientMapper: who the patient is at the target (rule 7)
    consent: object | None  # consent.service.ConsentService, None without the consent flow
    replay: object  # store.requests.Replay: spent assertion jtis, shared by every instance
    users: object = None  # mapping.users.UserMapper: who the user is at a `mapped` target


@dataclass
class StepOutcome:
    """One rule's outcome, for `explain`: held (ok), failed (the error), or not reached;
    ``pending``: held so far, the outcome left to a search a dry run does not make."""
    step: str
    ok: bool
    detail: str
    error: str | None = None
    reason: str | None = None  # the private detail of a refusal (never a token)
    pending: bool = False


class Pending(str):
    """A step's detail when a dry run stops where the exchange would ask the target."""


class ExchangeGrant(BaseGrant, TokenEndpointMixin):
    """Shared by every grant at /token; subclasses define GRANT_TYPE, GRANT_NAME,
    PARAMETERS, and the steps ``parse_parameters``, ``validate_presented``,
    ``check_allowed`` and ``check_upstream``."""
    GRANT_NAME = ""  # the audit's `grant`
    # The single-valued parameters this grant takes (RFC 6749 §3.2: at most once each; resource
    # and audience may repeat, RFC 8693 §2.1). grant_type and client authentication's are the pipeline's.
    PARAMETERS: tuple = ()
    ISSUED_TOKEN_TYPE: str | None = urns.ACCESS_TOKEN
    BINDING_ERROR = InvalidRequest  # a presented token bound to another DPoP key (RFC 9449 §6)

    # (name, method): the contract's check order after client authentication and grant type.
    STEPS = (("parameters", "check_parameters"), ("target", "check_target"),
             ("client has a trust", "check_any_trust"), ("tokens (rules 1, 2, 4)", "check_presented"),
             ("trust for issuer and target (rule 5)", "check_trust"), ("grant allowed by the trust", "check_allowed"),
             ("upstream client (rule 3)", "check_upstream"), ("scopes (rule 6)", "check_scopes"),
             ("consent", "check_consent"), ("patient (rule 7)", "check_patient"), ("user", "check_user"))

    def __init__(self, request, deps: Collaborators, record: dict, trace: list | None = None, dry_run: bool = False):
        super().__init__(request, None)
        self.deps, self.settings = deps, deps.settings
        self.cfg = deps.config()
        self.client_id = request.client.client_id
        self.trace, self.dry_run = trace, dry_run
        self.presented = self.target = self.trust = self.granted = None
        self.target_patient = self.consent = None
        self.requested_scopes = None
        self.would_search = False  # a dry run left the patient to a search at the target
        self.target_user = None  # the user's reference at a `mapped` target (Practitioner/789)
        self.would_search_user = False  # a dry run left the user to a search at the target
        self.matching = {}  # what patient and user matching share in this exchange (one deadline)
        self.audit = record
        record["grant"] = self.GRANT_NAME

    # -- Authlib's two phases ----------------------------------------------------------
    def validate_token_request(self):
        for name, method in self.STEPS:
            try:
                detail = getattr(self, method)()
            except Exception as e:
                if self.trace is not None:
                    self.trace.append(StepOutcome(name, False, getattr(e, "description", None) or str(e),
                                                  getattr(e, "error", None), getattr(e, "detail", None)))
                raise
            if self.trace is not None:
                self.trace.append(StepOutcome(name, True, str(detail or "held"), pending=isinstance(detail, Pending)))

    def create_token_response(self):
        """Authlib's second phase: the token decided (``decide_token``), then signed."""
        return self.decide_token().sign()

    def decide_token(self) -> Minting:
        """Everything about the token but its signature: claims, answer and the audit
        record complete (outcome, scope, jti), so the record can be committing while the
        token is signed (the token pipeline)."""
        p = self.presented
        now = int(time.time())
        life = self.lifetime(now)
        key = self.cfg.active_key
        if key is None:
            raise TemporarilyUnavailable("No signing key is active yet; run `token-exchange keys rotate`.")
        self.before_minting()
        scope = self.granted.format()
        jti = uuid.uuid4().hex
        # RFC 9068 §2.2; RFC 8693 §4.1 (act); idp: `sub` is unique only with its issuer.
        claims = {"iss": self.settings.issuer, "aud": self.target.base_url, "sub": p.sub,
                  "idp": p.issuer.url, "client_id": self.client_id, "scope": scope,
                  "iat": now, "exp": now + life, "jti": jti, "act": {"sub": self.client_id}}
        if self.target.users == "mapped":  # only the target's own URL for a user mapped just now
            if self.target_user is not None:
                claims["fhirUser"] = f"{self.target.base_url.rstrip('/')}/{self.target_user}"
        elif p.fhir_user:
            claims["fhirUser"] = p.fhir_user
        if self.target_patient is not None:
            claims["patient"] = self.target_patient
        jkt = self.request.dpop_jkt
        if jkt is not None:  # RFC 9449 §6.1: bound to the proof's key
            claims["cnf"] = {"jkt": jkt}
        body = {"access_token": None, "token_type": "Bearer" if jkt is None else "DPoP", "expires_in": life,
                "scope": scope}
        if self.ISSUED_TOKEN_TYPE:
            body["issued_token_type"] = self.request.requested_token_type
        if self.target_patient is not None:
            body["patient"] = self.target_patient
        self.audit.update(outcome="granted", scope_granted=scope, jti=jti)  # with `consent`: revocable by it
        return Minting(key, claims, body, self.TOKEN_RESPONSE_HEADER)

    @classmethod
    def advertised(cls, cfg) -> bool:
        """Whether discovery lists this grant type under the trust snapshot cfg."""
        return True

    def before_minting(self):
        """The last check before a token exists (the JWT grant spends its jti here)."""

    def lifetime(self, now: int) -> int:
        consent_expires = self.consent.expires if self.consent is not None else None
        return policy.lifetime(self.settings.token_ttl, self.trust, self.target, self.presented.expires, now,
                               consent_expires)

    # -- the shared steps --------------------------------------------------------------------
    def check_parameters(self):
        form = self.request.form
        reject_duplicates(form, self.PARAMETERS)
        self.parse_parameters(form)
        scope = form.get("scope")
        if scope is not None:
            try:  # bounded (scopes.MAX_SCOPES, MAX_SCOPE_TEXT), parsed once, never cached
                self.requested_scopes = scopes.parse(scope)
            except scopes.ScopeError as e:
                raise InvalidScope(str(e)) from None
        self.audit["scope_requested"] = audit.clip(scope, audit.SCOPE_TEXT_LENGTH)
        return "well formed"

    def parse_parameters(self, form):
        raise NotImplementedError

    def check_target(self):
        """RFC 8693 §2.1 resource / audience -> exactly one registered target."""
        self.target = resolve_target(self.request.form, self.cfg)
        self.audit["target"] = self.target.base_url
        return self.target.base_url

    def check_any_trust(self):
        trusts = self.cfg.trusts_by_client.get(self.client_id)
        if not trusts:
            raise UnauthorizedClient("This client has no trust relationship; ask an administrator to add one.")
        return f"{len(trusts)} trust(s)"

    def check_presented(self):
        p = self.presented = self.validate_presented()
        self.audit.update(issuer=p.issuer.url, subject=audit.clip(p.sub), source_patient=audit.clip(p.patient))
        # RFC 9449 §6: a token bound to a DPoP key (cnf.jkt) only with a proof by that key.
        bound = dpop.check_bound(self.bound_tokens(), self.request.dpop_jkt, self.BINDING_ERROR,
                                 proof_checked=not self.dry_run)
        return (f"issuer {p.issuer.url}, sub {p.sub}" + (f", patient {p.patient} at {p.source}" if p.patient else "")
                + (f", bound to DPoP key {bound}" if bound else ""))

    def validate_presented(self):
        raise NotImplementedError

    def bound_tokens(self):
        """(what, claims) of each presented token, for their DPoP binding (cnf)."""
        p = self.presented
        tokens = [("subject_token", p.claims)]
        if p.id_claims is not None and p.id_claims is not p.claims:
            tokens.append(("actor_token", p.id_claims))
        return tokens

    def check_trust(self):  # rule 5
        self.trust = policy.find_trust(self.cfg, self.client_id, self.presented.issuer.url, self.target)
        held = f"{self.trust.client_id} may use {self.trust.issuer} tokens for {self.target.base_url}"
        if self.trust.require_dpop and self.request.dpop_jkt is None:  # `trust add|update --require-dpop`
            if self.dry_run:
                return held + "; a DPoP proof is required (explain checks none)"
            raise InvalidRequest("A DPoP proof is required under this trust (RFC 9449): send a DPoP header.",
                                 detail="no DPoP proof; the trust requires DPoP")
        return held

    def check_allowed(self):
        raise NotImplementedError

    def check_upstream(self):
        raise NotImplementedError

    def check_scopes(self):  # rule 6
        self.granted = policy.decide_scopes(self.requested_scopes, self.presented, self.trust)
        return self.granted.format()

    def check_consent(self):
        consent = self.deps.consent
        if self.trust.consent != "required":
            return "not required by the trust"
        if consent is None:
            raise TemporarilyUnavailable("Consent is required by this trust but the consent flow is not available.")
        self.consent = consent.covering(self.presented, self.client_id, self.target.id, self.granted,
                                        dry_run=self.dry_run)
        self.audit["consent"] = self.consent.id
        return f"consent {self.consent.id} covers it until {self.consent.expires_iso}"

    def check_patient(self):  # rule 7
        p = self.presented
        if not self.granted.has_patient:
            return "no patient/ scope at stake"
        mapped = None
        if p.patient:
            try:
                mapped = self.deps.patients.map(p, self.target, self.cfg, dry_run=self.dry_run, shared=self.matching)
            except MatchingUnavailable:
                self.audit["link"] = MatchingUnavailable.LINK
                raise
        if mapped is not None and mapped.origin == WOULD_SEARCH:  # only in a dry run
            # POST /token would search now and grant patient/ scopes on exactly one match:
            # explain keeps them and says the outcome depends on that search.
            self.would_search = True
            return Pending(mapped.explain)
        if mapped is None or mapped.target_patient is None:
            self.audit["link"] = mapped.origin if mapped is not None else None
            self.granted = policy.without_patient(self.granted)
            why = mapped.explain if mapped is not None else "the presented tokens name no patient"
            return f"patient/ scopes dropped: {why}"
        self.target_patient = mapped.target_patient
        self.audit.update(target_patient=mapped.target_patient, link=mapped.origin)
        return f"{p.patient} at {p.source} is {mapped.target_patient} at the target ({mapped.explain})"

    def check_user(self):  # contract, "The user at the target"; after the patient
        p = self.presented
        if self.target.users != "mapped":
            if p.fhir_user:
                u = source_user(p)
                self.audit["source_user"] = u.url if u is not None else None
            return "the target takes users as-is: fhirUser passed on" if p.fhir_user else "no user named"
        if not policy.has_user(self.granted):
            return "no user/ scope at stake"
        try:
            mapped = self.deps.users.map(p, self.target, self.cfg, self.target_patient, dry_run=self.dry_run,
                                         shared=self.matching)
        except UserMappingUnavailable:
            u = source_user(p)
            self.audit.update(user_link=UserMappingUnavailable.LINK, source_user=u.url if u is not None else None)
            raise
        self.audit["source_user"] = mapped.source_user
        if mapped.origin == WOULD_SEARCH:  # only in a dry run
            self.would_search_user = True
            return Pending(mapped.explain)
        self.audit["user_link"] = mapped.origin
        if mapped.target_user is None:
            self.granted = policy.without_user(self.granted)
            return f"user/ scopes dropped: {mapped.explain}"
        self.target_user = mapped.target_user
        self.audit["target_user"] = mapped.target_user
        return f"{mapped.source_user} is {mapped.target_user} at the target ({mapped.explain})"


class Minting:
    """A decided token, not signed yet: ``sign()`` -> the token response (status, body, headers)."""
    __slots__ = ("key", "claims", "body", "headers")

    def __init__(self, key, claims: dict, body: dict, headers):
        self.key, self.claims, self.body, self.headers = key, claims, body, headers

    def sign(self) -> tuple:
        self.body["access_token"] = self.key.mint(self.claims)
        return 200, self.body, self.headers


def resolve_target(form, cfg):
    """RFC 8693 §2.1 resource / audience (RFC 8707 §2) -> exactly one registered target."""
    resources, audiences = form.getlist("resource"), form.getlist("audience")
    if not resources and not audiences:
        raise InvalidRequest("Name the target FHIR server with resource (its base URL) or audience.")
    found = set()
    for r in resources:
        parts = _split(r)
        if parts is None or not parts.scheme or not parts.netloc or "#" in r:
            raise InvalidTarget("resource must be an absolute URI without a fragment (RFC 8707 section 2).")
        t = cfg.targets_by_url.get(r)
        if t is None:
            hint = ""
            if r.endswith("/") and r.rstrip("/") in cfg.targets_by_url:
                hint = " (without the trailing slash it is; URLs match exactly as registered)"
            elif r + "/" in cfg.targets_by_url:
                hint = " (with a trailing slash it is; URLs match exactly as registered)"
            raise InvalidTarget("The resource is not a registered target FHIR server" + hint + ".")
        found.add(t.id)
    for a in audiences:
        t = cfg.targets_by_url.get(a) or cfg.targets_by_name.get(a)
        if t is None:
            raise InvalidTarget("The audience is not a registered target FHIR server.")
        found.add(t.id)
    if len(found) != 1:
        raise InvalidTarget("Request exactly one target FHIR server per exchange.")
    return cfg.targets_by_id[found.pop()]


def _split(url):
    try:
        return urlsplit(url)
    except ValueError:
        return None
