"""A stand-in EHR for the README's worked example: not an EHR, and never for production.

    python examples/ehr.py --port 8001

serves, at http://127.0.0.1:8001 (its issuer URL):

- ``/.well-known/openid-configuration``: OpenID Connect discovery (issuer, jwks_uri, algorithms);
- ``/jwks``: the public half of an RSA key made at start (a new one each start);
- ``GET /tokens?patient=ID``: what a SMART launch for patient ID would give the app
  (upstream client ``--client``): ``{"access_token", "id_token", "patient", "source", ...}``,
  both RS256 JWTs valid for 10 minutes; the access token's ``aud`` is ``--source``, the
  FHIR server the patient id belongs to, and the ID token names the patient and that source,
  and the user (``fhirUser`` = ``{source}/Practitioner/{--user}``); ``&npi=N`` adds the user's
  NPI as ``fhirUser_identifier`` (user matching at a target);
- ``GET /grant?patient=ID&audience=URL&client_id=C``: a JWT authorization grant (identity
  chaining, ``typ`` ``oauth-id-jag+jwt``) for the service at URL and its client C, valid for
  4 minutes: ``{"assertion": ...}``.

Standard library, PyJWT and cryptography only (what token-exchange itself depends on).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}\Z")  # FHIR R4 id
SCOPE = "patient/*.rs user/*.rs openid fhirUser"
NPI = "http://hl7.org/fhir/sid/us-npi"  # the user's identifier system, with ?npi=


class StandInEHR:
    def __init__(self, issuer: str, client: str, source: str, user: str):
        self.issuer, self.client, self.source, self.user = issuer, client, source, user
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "stand-in-" + uuid.uuid4().hex[:8]

    def discovery(self) -> dict:
        return {"issuer": self.issuer, "jwks_uri": self.issuer + "/jwks",
                "id_token_signing_alg_values_supported": ["RS256"], "subject_types_supported": ["public"],
                "response_types_supported": ["code"], "scopes_supported": SCOPE.split()}

    def jwks(self) -> dict:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        return {"keys": [jwk]}

    def sign(self, claims: dict, typ: str | None = None) -> str:
        headers = {"kid": self.kid} | ({"typ": typ} if typ else {})
        return jwt.encode(claims, self.key, algorithm="RS256", headers=headers)

    def tokens(self, patient: str, npi: str | None = None) -> dict:
        """A SMART launch's access token (for the source FHIR server) and ID token (for the app);
        with ``npi``, the ID token carries the user's NPI in ``fhirUser_identifier`` (for user
        matching at a target, docs/USERS.md)."""
        now = int(time.time())
        access = {"iss": self.issuer, "sub": self.user, "aud": self.source, "client_id": self.client,
                  "scope": SCOPE, "iat": now, "exp": now + 600, "jti": uuid.uuid4().hex}
        ident = {"iss": self.issuer, "sub": self.user, "aud": self.client, "azp": self.client, "iat": now,
                 "exp": now + 600, "fhirUser": f"{self.source}/Practitioner/{self.user}",
                 "patient": patient, "source": self.source}
        if npi:
            ident["fhirUser_identifier"] = [{"system": NPI, "value": npi}]
        return {"access_token": self.sign(access), "id_token": self.sign(ident), "token_type": "Bearer",
                "expires_in": 600, "scope": SCOPE, "patient": patient, "source": self.source}

    def grant(self, patient: str, audience: str, client_id: str) -> dict:
        """A JWT authorization grant for the service at `audience` and its client `client_id`."""
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": self.user, "aud": audience, "client_id": client_id,
                  "azp": self.client, "iat": now, "exp": now + 240, "jti": uuid.uuid4().hex,
                  "scope": "patient/*.rs", "patient": patient, "source": self.source,
                  "fhirUser": f"{self.source}/Practitioner/{self.user}"}
        return {"assertion": self.sign(claims, typ="oauth-id-jag+jwt")}


def handler(ehr: StandInEHR):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: the example's output is the service's
            pass

        def answer(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/.well-known/openid-configuration":
                return self.answer(200, ehr.discovery())
            if url.path == "/jwks":
                return self.answer(200, ehr.jwks())
            if url.path in ("/tokens", "/grant"):
                patient = q.get("patient", "")
                if not FHIR_ID.match(patient):
                    return self.answer(400, {"error": "give ?patient=ID (a FHIR id)"})
                if url.path == "/tokens":
                    return self.answer(200, ehr.tokens(patient, q.get("npi")))
                if not q.get("audience") or not q.get("client_id"):
                    return self.answer(400, {"error": "give ?audience=the service's issuer URL&client_id=C"})
                return self.answer(200, ehr.grant(patient, q["audience"], q["client_id"]))
            return self.answer(404, {"error": "not found"})
    return Handler


def main(argv=None):
    p = argparse.ArgumentParser(description="A stand-in EHR for token-exchange's worked example (not for "
                                            "production): a key, its JWKS, discovery, and signed tokens.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--client", default="vendor-at-ehr", help="The app's client id at this EHR (the upstream client).")
    p.add_argument("--source", default="https://fhir.a.example/fhir",
                   help="The FHIR server the patient ids belong to (the tokens' aud and source).")
    p.add_argument("--user", default="user-1", help="The signed-in user's sub.")
    args = p.parse_args(argv)
    issuer = f"http://{args.host}:{args.port}"
    ehr = StandInEHR(issuer, args.client, args.source, args.user)
    try:
        server = ThreadingHTTPServer((args.host, args.port), handler(ehr))
    except OSError as e:
        sys.exit(f"error: cannot listen on {args.host}:{args.port}: {e.strerror}")
    print(f"stand-in EHR at {issuer} (not for production)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
