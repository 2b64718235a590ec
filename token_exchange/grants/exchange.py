"""RFC 8693 §2.1 token exchange: the EHR's access token (with its ID token as
actor_token), or the ID token alone (the OpenID form)."""
from __future__ import annotations

from .. import policy, urns
from ..errors import InvalidRequest
from .base import MAX_TOKEN_LENGTH, ExchangeGrant


class TokenExchangeGrant(ExchangeGrant):
    GRANT_TYPE = urns.TOKEN_EXCHANGE
    GRANT_NAME = "token-exchange"
    PARAMETERS = ("subject_token", "subject_token_type", "actor_token", "actor_token_type", "scope",
                  "requested_token_type")

    def parse_parameters(self, form):
        req = self.request
        subject_token = form.get("subject_token")
        subject_type = form.get("subject_token_type")
        if not subject_token:
            raise InvalidRequest("The subject_token parameter is required.")
        if not subject_type:
            raise InvalidRequest("The subject_token_type parameter is required.")
        if subject_type not in urns.SUBJECT_TOKEN_TYPES:
            raise InvalidRequest("Unsupported subject_token_type; use " + ", ".join(urns.SUBJECT_TOKEN_TYPES) + ".")
        if len(subject_token) > MAX_TOKEN_LENGTH:
            raise InvalidRequest("The subject_token is too long.")
        actor_token, actor_type = form.get("actor_token"), form.get("actor_token_type")
        if (actor_token is None) != (actor_type is None) or actor_token == "":
            raise InvalidRequest("actor_token and actor_token_type must be sent together.")
        if actor_type is not None:
            if actor_type not in urns.ACTOR_TOKEN_TYPES:
                raise InvalidRequest(f"Unsupported actor_token_type; the actor token is the EHR's ID token "
                                     f"({urns.ID_TOKEN}).")
            if subject_type == urns.ID_TOKEN:
                raise InvalidRequest("In the OpenID exchange the ID token is the subject_token; send no actor_token.")
            if len(actor_token) > MAX_TOKEN_LENGTH:
                raise InvalidRequest("The actor_token is too long.")
        requested = form.get("requested_token_type") or urns.ACCESS_TOKEN
        if requested not in urns.ISSUED_TOKEN_TYPES:
            raise InvalidRequest("Unsupported requested_token_type; use " + " or ".join(urns.ISSUED_TOKEN_TYPES) + ".")
        req.subject_token, req.subject_token_type = subject_token, subject_type
        req.actor_token, req.actor_token_type = actor_token, actor_type
        req.requested_token_type = requested

    def validate_presented(self):  # rules 1, 2, 4
        return self.deps.validator.validate(self.request, self.cfg, self.client_id, self.target)

    def check_allowed(self):
        policy.allowed_form(self.presented, self.trust)
        return "the OpenID exchange" if self.presented.subject_type == urns.ID_TOKEN else "the access-token exchange"

    def check_upstream(self):  # rule 3
        p = self.presented
        if not p.sub:
            raise InvalidRequest("The subject token names no subject (sub).")
        policy.check_upstream(p, self.trust)
        return f"issued to {self.trust.upstream_client_id}"
