"""Form bodies, strictly (RFC 6749 §3.2, §4.1.3 and §5.2): read, parsed, and each
parameter at most once.

Read from the WSGI environ, so the token endpoint (served without Flask's request
context) and the other endpoints share it.
"""
from __future__ import annotations

from urllib.parse import parse_qsl

from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_options_header
from werkzeug.wsgi import get_content_length, get_input_stream

from .errors import InvalidRequest, RequestTooLarge

FORM = "application/x-www-form-urlencoded"


def read_form(environ, max_body: int) -> MultiDict:
    """The request body as a form, strictly: size first, form-encoded POST only,
    no parameters in the query string (RFC 6749 §3.2)."""
    def too_large():
        return RequestTooLarge(f"The request body is larger than {max_body // 1024} KiB.")
    length = get_content_length(environ)
    if length is None:
        # No Content-Length (chunked): read at most the limit + 1 byte, never more. The raw
        # input, because Werkzeug's limited stream stops silently at the limit.
        body = environ["wsgi.input"].read(max_body + 1) if environ.get("wsgi.input_terminated") else b""
        if len(body) > max_body:
            raise too_large()
    elif length > max_body:
        raise too_large()
    if parse_options_header(environ.get("CONTENT_TYPE", ""))[0] != FORM:
        raise InvalidRequest(f"Send the request as {FORM}.")
    if environ.get("QUERY_STRING"):
        raise InvalidRequest("Send parameters in the form body, not in the query string.")
    if length is not None:
        try:
            body = get_input_stream(environ).read()  # at most Content-Length bytes
        except HTTPException:  # Werkzeug's ClientDisconnected: the body ended early
            body = b""
        if len(body) < length:
            raise InvalidRequest("The request body is shorter than its Content-Length.")
    return parse_form(body)


def parse_form(body: bytes) -> MultiDict:
    """application/x-www-form-urlencoded -> MultiDict, the same parse Werkzeug's form
    parser runs (urllib's parse_qsl), without its stream and parser objects, and strict
    where Werkzeug is silent: a body that is not UTF-8 is refused, not read as empty."""
    try:
        return MultiDict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict"))
    except UnicodeDecodeError:
        raise InvalidRequest("The form body is not UTF-8; percent-encode parameters as UTF-8.") from None


def reject_duplicates(form: MultiDict, names) -> None:
    """RFC 6749 §3.2: request parameters MUST NOT be included more than once. The token
    pipeline calls it for the client-authentication parameters and grant_type, and each
    grant for the parameters it declares (``PARAMETERS``)."""
    for name in names:
        if len(form.getlist(name)) > 1:
            raise InvalidRequest(f"The {name} parameter appears more than once.")
