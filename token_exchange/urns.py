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
