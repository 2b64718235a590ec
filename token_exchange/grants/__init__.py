"""The grants at /token, one class per grant type (base.py holds what they share)."""
from .base import Collaborators, ExchangeGrant, StepOutcome
from .exchange import TokenExchangeGrant
from .jwt_bearer import JWTAuthorizationGrant

GRANTS = (TokenExchangeGrant, JWTAuthorizationGrant)
__all__ = ["GRANTS", "Collaborators", "ExchangeGrant", "JWTAuthorizationGrant", "StepOutcome", "TokenExchangeGrant"]
