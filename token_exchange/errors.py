"""Typed errors Authlib lacks, in its style: raise them, never return them.

Each carries a public ``description`` (what the caller should fix) and may carry
a private ``detail`` for the log. They become HTTP in exactly one place
(``endpoints.error_answer``).
"""
from authlib.oauth2.rfc6749.errors import (InvalidClientError, InvalidGrantError,  # noqa: F401
                                           InvalidRequestError, InvalidScopeError, OAuth2Error,
                                           UnauthorizedClientError)


def _ascii(text):
    """RFC 6749 §5.2: error_description is %x20-21 / %x23-5B / %x5D-7E only."""
    if text is None:
        return None
    return "".join(c if (0x20 <= ord(c) <= 0x7E and c not in '"\\') else "'" if c == '"' else "?"
                   for c in text.replace("\u00a7", "section "))


class Detailed:
    """A public description (ASCII, what to fix) and a private detail (for the log)."""

    def __init__(self, description=None, detail=None, **kw):
        super().__init__(description=_ascii(description), **kw)
        self.detail = detail


class InvalidTarget(Detailed, OAuth2Error):
    """RFC 8693 §2.2.2: the requested resource or audience is unknown, malformed or not allowed."""
    error = "invalid_target"
    status_code = 400


class InvalidRequest(Detailed, InvalidRequestError):
    pass


class InvalidClient(Detailed, InvalidClientError):
    status_code = 401

    def get_headers(self):
        # RFC 6749 §5.2: a 401 for client authentication carries WWW-Authenticate.
        return super().get_headers() + [("WWW-Authenticate", 'Basic realm="token-exchange"')]


class UnauthorizedClient(Detailed, UnauthorizedClientError):
    pass


class InvalidGrant(Detailed, InvalidGrantError):
    """RFC 6749 §5.2 invalid_grant: the assertion is invalid, expired, replayed or for another client."""


class InvalidScope(Detailed, InvalidScopeError):
    pass


class UnsupportedGrantType(Detailed, OAuth2Error):
    """RFC 6749 §5.2 (Authlib's own takes the grant type, not a description)."""
    error = "unsupported_grant_type"


class RequestTooLarge(InvalidRequest):
    status_code = 413


class TemporarilyUnavailable(Detailed, OAuth2Error):
    """RFC 6749 §4.1.2.1 temporarily_unavailable, as an HTTP status with Retry-After."""
    error = "temporarily_unavailable"

    def __init__(self, description=None, status_code=503, retry_after=5, **kw):
        super().__init__(description=description, status_code=status_code, **kw)
        self.retry_after = retry_after

    def get_headers(self):
        return super().get_headers() + [("Retry-After", str(self.retry_after))]


class ConsentRequired(Detailed, OAuth2Error):
    """The trust requires the user's consent and none covers this exchange (contract,
    "Consent for patient-facing apps"). The body adds ``consent_uri`` (a single-use
    ticket, opened in the user's browser) and ``expires_in`` (its lifetime, seconds);
    `explain` raises it without them (it creates no ticket)."""
    error = "consent_required"
    status_code = 400

    def __init__(self, description=None, consent_uri=None, expires_in=None, **kw):
        super().__init__(description=description, **kw)
        self.consent_uri, self.expires_in = consent_uri, expires_in

    def get_body(self):
        body = super().get_body()
        if self.consent_uri:
            body += [("consent_uri", self.consent_uri), ("expires_in", self.expires_in)]
        return body

