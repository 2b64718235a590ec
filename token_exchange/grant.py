"""TokenExchangeGrant: the RFC 8693 request, start to finish, in Authlib's style.

Authlib ships no RFC 8693 grant; this is one ``BaseGrant`` with a
``GRANT_TYPE`` constant, ``validate_token_request()`` then
``create_token_response()``, raising typed ``OAuth2Error``s.
"""
from __future__ import annotations

import time
import uuid
from urllib.parse import urlsplit

from authlib.oauth2.rfc6749.grants import BaseGrant, TokenEndpointMixin

from . import policy, scopes, urns
from .errors import InvalidRequest, InvalidScope, InvalidTargetError, TemporarilyUnavailable, UnauthorizedClient

# grant_type and the client-authentication parameters are checked by the server first.
SINGLE_VALUED = ("subject_token", "subject_token_type", "actor_token", "actor_token_type", "scope",
                 "requested_token_type")
MAX_TOKEN_LENGTH = 16 * 1024


class TokenExchangeGrant(BaseGrant, TokenEndpointMixin):
    GRANT_TYPE = urns.TOKEN_EXCHANGE
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]

    def __init__(self, request, server):
        super().__init__(request, server)
        self.presented = None
        self.target = None
        self.trust = None
        self.granted = None
        self.target_patient = None
        self.audit = request.audit

    # RFC 8693 §2.1 ---------------------------------------------------------
    def validate_token_request(self):
        req, server = self.request, self.server
        cfg = server.store.config()
        client_id = req.client.client_id
        self._parse_parameters(req)
        self.target = self._resolve_target(req, cfg)
        self.audit["target"] = self.target.base_url
        if not cfg.trusts_by_client.get(client_id):
            raise UnauthorizedClient("This client has no trust relationship; ask an administrator to add one.")
        p = server.validator.validate(req, cfg, client_id, self.target)  # rules 1, 2, 4
        self.presented = p
        self.audit.update(issuer=p.issuer.url, subject=_clip(p.sub), source_patient=_clip(p.patient))
        self.trust = policy.find_trust(cfg, client_id, p.issuer.url, self.target)  # rule 5
        policy.allowed_form(p, self.trust)
        policy.check_upstream(p, self.trust)  # rule 3
        if not p.sub:
            raise InvalidRequest("The subject token names no subject (sub).")
        granted = policy.decide_scopes(req.scope_param, p, self.trust)  # rule 6
        if granted.has_patient:  # rule 7
            link = server.store.find_link(p.source, p.patient, self.target.id) if p.patient else None
            if link is None:
                granted = policy.without_patient(granted)
            else:
                self.target_patient = link
                self.audit["target_patient"] = link
        self.granted = granted

    def create_token_response(self):
        req, server, p = self.request, self.server, self.presented
        now = int(time.time())
        life = policy.lifetime(server.settings.token_ttl, self.trust, self.target, p.expires, now)
        key = server.store.config().active_key
        if key is None:
            raise TemporarilyUnavailable("No signing key is active yet; run `token-exchange keys rotate`.")
        scope = self.granted.format()
        jti = uuid.uuid4().hex
        claims = {"iss": server.settings.issuer, "aud": self.target.base_url, "sub": p.sub,
                  "idp": p.issuer.url, "client_id": req.client.client_id, "scope": scope,
                  "iat": now, "exp": now + life, "jti": jti, "act": {"sub": req.client.client_id}}
        if p.fhir_user:
            claims["fhirUser"] = p.fhir_user
        if self.target_patient is not None:
            claims["patient"] = self.target_patient
        token = key.mint(claims)
        body = {"access_token": token, "issued_token_type": req.requested_token_type,
                "token_type": "Bearer", "expires_in": life, "scope": scope}
        if self.target_patient is not None:
            body["patient"] = self.target_patient
        self.audit.update(outcome="granted", scope_granted=scope, jti=jti)
        return 200, body, self.TOKEN_RESPONSE_HEADER

    # -- helpers ------------------------------------------------------------
    @staticmethod
    def _parse_parameters(req):
        form = req.form
        for name in SINGLE_VALUED:
            if len(form.getlist(name)) > 1:
                raise InvalidRequest(f"The {name} parameter appears more than once.")
        subject_token = form.get("subject_token")
        subject_type = form.get("subject_token_type")
        if not subject_token:
            raise InvalidRequest("The subject_token parameter is required.")
        if not subject_type:
            raise InvalidRequest("The subject_token_type parameter is required.")
        if subject_type not in urns.SUBJECT_TOKEN_TYPES:
            raise InvalidRequest("Unsupported subject_token_type; use access_token, jwt or id_token.")
        if len(subject_token) > MAX_TOKEN_LENGTH:
            raise InvalidRequest("The subject_token is too long.")
        actor_token, actor_type = form.get("actor_token"), form.get("actor_token_type")
        if (actor_token is None) != (actor_type is None) or actor_token == "":
            raise InvalidRequest("actor_token and actor_token_type must be sent together.")
        if actor_type is not None:
            if actor_type not in urns.ACTOR_TOKEN_TYPES:
                raise InvalidRequest("Unsupported actor_token_type; the actor token is the EHR's ID token "
                                     "(urn:ietf:params:oauth:token-type:id_token).")
            if subject_type == urns.ID_TOKEN:
                raise InvalidRequest("In the OpenID exchange the ID token is the subject_token; send no actor_token.")
            if len(actor_token) > MAX_TOKEN_LENGTH:
                raise InvalidRequest("The actor_token is too long.")
        requested = form.get("requested_token_type") or urns.ACCESS_TOKEN
        if requested not in urns.ISSUED_TOKEN_TYPES:
            raise InvalidRequest("Unsupported requested_token_type; use access_token or jwt.")
        scope = form.get("scope")
        if scope is not None:
            try:
                scopes.parse(scope)
            except scopes.ScopeError as e:
                raise InvalidScope(str(e)) from None
        req.subject_token, req.subject_token_type = subject_token, subject_type
        req.actor_token, req.actor_token_type = actor_token, actor_type
        req.requested_token_type, req.scope_param = requested, scope
        req.audit["scope_requested"] = _clip(scope, 2000)

    @staticmethod
    def _resolve_target(req, cfg):
        """RFC 8693 §2.1 resource / audience -> exactly one registered target."""
        resources, audiences = req.form.getlist("resource"), req.form.getlist("audience")
        if not resources and not audiences:
            raise InvalidRequest("Name the target FHIR server with resource (its base URL) or audience.")
        found = set()
        for r in resources:
            parts = _split(r)
            if parts is None or not parts.scheme or not parts.netloc or "#" in r:
                raise InvalidTargetError("resource must be an absolute URI without a fragment (RFC 8707 section 2).")
            t = cfg.targets_by_url.get(r)
            if t is None:
                raise InvalidTargetError("The resource is not a registered target FHIR server.")
            found.add(t.id)
        for a in audiences:
            t = cfg.targets_by_url.get(a) or cfg.targets_by_name.get(a)
            if t is None:
                raise InvalidTargetError("The audience is not a registered target FHIR server.")
            found.add(t.id)
        if len(found) != 1:
            raise InvalidTargetError("Request exactly one target FHIR server per exchange.")
        return cfg.targets_by_id[found.pop()]


def _split(url):
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _clip(value, n=255):
    return value[:n] if isinstance(value, str) else value
