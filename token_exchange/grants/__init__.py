"""The grants at /token, one class per grant type (base.py holds what they share)."""
from .base import Collaborators, ExchangeGrant, StepOutcome  # noqa: F401
from .exchange import TokenExchangeGrant
from .jwt_bearer import JWTAuthorizationGrant

GRANTS = (TokenExchangeGrant, JWTAuthorizationGrant)
