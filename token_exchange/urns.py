"""Every URN and fixed name the protocol uses: one place each."""
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # RFC 8693 §2.1
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"  # RFC 7523 §2.1 (the JWT authorization grant)
# The JWT authorization grant's header typ (identity chaining draft); RFC 7515 §4.1.9 lets
# the "application/" prefix be left out, and media types compare case-insensitively.
JAG_TYPES = ("oauth-id-jag+jwt", "application/oauth-id-jag+jwt")
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # RFC 8693 §3
JWT = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
CLIENT_ASSERTION_JWT = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2
JTI_URN_PREFIX = "urn:ietf:params:oauth:jti:"

SUBJECT_TOKEN_TYPES = (ACCESS_TOKEN, JWT, ID_TOKEN)
ACTOR_TOKEN_TYPES = (ID_TOKEN,)
ISSUED_TOKEN_TYPES = (ACCESS_TOKEN, JWT)

# Algorithms accepted from upstream issuers: asymmetric only (never none, never HMAC).
ASYMMETRIC_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
DEFAULT_ISSUER_ALGS = ("RS256", "RS384", "ES256", "ES384")
CLIENT_ASSERTION_ALGS = ("RS256", "RS384", "PS256", "ES256", "ES384")
CLOCK_LEEWAY = 60  # seconds, on exp / nbf / iat
ASSERTION_MAX_AHEAD = 300  # SMART Backend Services: exp at most 5 minutes ahead
MIN_SECRET_LENGTH = 32
