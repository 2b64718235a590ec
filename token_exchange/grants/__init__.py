"""The grants at /token, one class per grant type (base.py holds what they share)."""
from .base import Collaborators, ExchangeGrant, StepOutcome
from .exchange import TokenExchangeGrant
from .jwt_bearer import JWTAuthorizationGrant

GRANTS = (TokenExchangeGrant, JWTAuthorizationGrant)
__all__ = ["GRANTS", "Collaborators", "ExchangeGrant", "JWTAuthorizationGrant", "StepOutcome", "TokenExchangeGrant",
           "advertised_grant_types"]


def advertised_grant_types(cfg) -> list[str]:
    """The grant types this server names (discovery's grant_types_supported, and the
    unsupported_grant_type text) under the trust snapshot ``cfg``: each grant says
    whether it is on offer (``ExchangeGrant.advertised``)."""
    return [g.GRANT_TYPE for g in GRANTS if g.advertised(cfg)]
