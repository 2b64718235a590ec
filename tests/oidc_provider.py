"""A real OpenID Connect provider for the consent tests, built on Authlib's server
side: the authorization code grant with PKCE (S256 required) and OpenID Connect ID
tokens, RFC 9207's `iss` in the authorization response, client_secret_basic and
private_key_jwt client authentication, its own login form and a single-sign-on
cookie. It runs in-process on a loopback port (werkzeug, threaded).

It is also the EHR whose tokens the service exchanges (same issuer, same key):
``access_token()`` / ``id_token()`` sign launch tokens like tests/fakes.FakeEHR.
Tests may set ``id_token_overrides`` (claims forced into the next ID tokens: a
wrong nonce, aud or iss) and read ``authorize_requests`` (the query of every
authorization request) and ``token_requests`` (every token request's form).
"""
from __future__ import annotations

import html
import json
import secrets
import threading
import time
import uuid

import jwt
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import ClientMixin
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant as _CodeGrant
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9207 import IssuerParameter
from authlib.oidc.core import AuthorizationCodeMixin
from authlib.oidc.core.grants import OpenIDCode
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask
from flask import make_response, request
from joserfc.jwk import KeySet, RSAKey
from werkzeug.serving import make_server

from fakes import SOURCE, UPSTREAM, free_port

PRIVATE_KEY_JWT = "private_key_jwt"


class User:
    def __init__(self, username, password, sub, fhir_user):
        self.username, self.password, self.sub, self.fhir_user = username, password, sub, fhir_user


class Client(ClientMixin):
    def __init__(self, client_id, redirect_uris, secret=None, jwks=None):
        self.client_id, self.redirect_uris, self.secret, self.jwks = client_id, list(redirect_uris), secret, jwks

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope):
        return " ".join(s for s in (scope or "").split() if s in ("openid", "fhirUser"))

    def check_redirect_uri(self, redirect_uri):
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret):
        return self.secret is not None and secrets.compare_digest(client_secret, self.secret)

    def check_endpoint_auth_method(self, method, endpoint):
        if self.jwks is not None:
            return method == PRIVATE_KEY_JWT
        return method == "client_secret_basic"

    def check_response_type(self, response_type):
        return response_type == "code"

    def check_grant_type(self, grant_type):
        return grant_type == "authorization_code"


class Code(AuthorizationCodeMixin):
    def __init__(self, code, client_id, redirect_uri, scope, user, nonce, challenge, method):
        self.code, self.client_id, self.redirect_uri, self.scope, self.user = code, client_id, redirect_uri, scope, user
        self.nonce, self.code_challenge, self.code_challenge_method = nonce, challenge, method
        self.auth_time = int(time.time())

    def get_redirect_uri(self):
        return self.redirect_uri

    def get_scope(self):
        return self.scope

    def get_nonce(self):
        return self.nonce

    def get_auth_time(self):
        return self.auth_time

    def get_acr(self):
        return None

    def get_amr(self):
        return None


class OIDCProvider:
    def __init__(self, name="ehr-op"):
        self.port = free_port()
        self.host = "localhost"  # another site than the service's 127.0.0.1, as in real life
        self.issuer = f"http://{self.host}:{self.port}/{name}"
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = f"{name}-k1"
        self.pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        self.users: dict[str, User] = {}
        self.clients: dict[str, Client] = {}
        self.codes: dict[str, Code] = {}
        self.sso: dict[str, str] = {}  # op cookie -> username
        self.id_token_overrides: dict = {}
        self.authorize_requests: list[dict] = []
        self.token_requests: list[dict] = []
        self.iss_parameter = True  # RFC 9207
        self.app = self._make_app(name)
        self.server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # -- set-up by tests ---------------------------------------------------------------
    def add_user(self, username, password, sub, fhir_user):
        self.users[username] = User(username, password, sub, fhir_user)

    def add_client(self, client_id, redirect_uris, secret=None, jwks=None):
        self.clients[client_id] = Client(client_id, redirect_uris, secret, jwks)

    def jwks(self):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, alg="RS256", use="sig")
        return {"keys": [jwk]}

    def reset(self):
        self.sso.clear()
        self.codes.clear()
        self.id_token_overrides = {}
        self.authorize_requests.clear()
        self.token_requests.clear()
        self.iss_parameter = True

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    # -- the EHR's launch tokens (for /token at the service) --------------------------------
    def sign(self, claims):
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def access_token(self, sub="user-1", scope="patient/*.rs user/*.rs openid fhirUser", client=UPSTREAM,
                     ttl=600, **extra):
        now = int(time.time())
        c = {"iss": self.issuer, "sub": sub, "aud": SOURCE, "client_id": client, "scope": scope, "iat": now,
             "exp": now + ttl, "jti": uuid.uuid4().hex}
        c.update(extra)
        return self.sign({k: v for k, v in c.items() if v is not None})

    def id_token(self, sub="user-1", patient="a-123", source=SOURCE, client=UPSTREAM, ttl=600, fhir_user=None,
                 **extra):
        now = int(time.time())
        c = {"iss": self.issuer, "sub": sub, "aud": client, "azp": client, "iat": now, "exp": now + ttl,
             "fhirUser": fhir_user or f"{SOURCE}/Patient/{patient}", "patient": patient, "source": source}
        c.update(extra)
        return self.sign({k: v for k, v in c.items() if v is not None})

    # -- the provider ----------------------------------------------------------------------------
    def _make_app(self, name):
        op = self
        app = Flask(f"oidc-provider-{name}")
        app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"authorization_code": 300}
        prefix = f"/{name}"

        class CodeGrant(_CodeGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", PRIVATE_KEY_JWT]

            def save_authorization_code(self, code, req):
                data = req.payload.data
                op.codes[code] = Code(code, req.client.client_id, req.payload.redirect_uri, req.scope, req.user,
                                      data.get("nonce"), data.get("code_challenge"),
                                      data.get("code_challenge_method"))

            def query_authorization_code(self, code, client):
                item = op.codes.get(code)
                return item if item is not None and item.client_id == client.client_id else None

            def delete_authorization_code(self, authorization_code):
                op.codes.pop(authorization_code.code, None)

            def authenticate_user(self, authorization_code):
                return authorization_code.user

        class IDTokens(OpenIDCode):
            def exists_nonce(self, nonce, req):
                return any(c.nonce == nonce for c in op.codes.values())

            def resolve_client_private_key(self, client):
                return RSAKey.import_key(op.pem)

            def get_encode_header(self, client):
                return {"alg": "RS256", "kid": op.kid}

            def get_client_algorithm(self, client):
                return "RS256"

            def get_client_claims(self, client):
                return {"iss": op.issuer, "aud": [client.client_id]}

            def generate_user_info(self, user, scope):
                info = {"sub": user.sub}
                if "fhirUser" in scope.split():
                    info["fhirUser"] = user.fhir_user
                info.update(op.id_token_overrides)
                return info

        class ServiceAssertion(JWTBearerClientAssertion):
            CLIENT_AUTH_METHOD = PRIVATE_KEY_JWT

            def get_audiences(self):
                return [op.issuer + "/token"]

            def resolve_client_public_key(self, client):
                return KeySet.import_key_set(client.jwks)

            def validate_jti(self, claims, jti):
                return True

        server = AuthorizationServer(app, query_client=self.clients.get, save_token=lambda token, req: None)
        server.register_grant(CodeGrant, [CodeChallenge(required=True), IDTokens(require_nonce=True)])
        server.register_client_auth_method(PRIVATE_KEY_JWT, ServiceAssertion())

        class Issuer(IssuerParameter):
            def add_issuer_parameter(self, authorization_server, response):
                if op.iss_parameter:
                    super().add_issuer_parameter(authorization_server, response)

            def get_issuer(self):
                return op.issuer

        server.register_extension(Issuer())

        @app.get(prefix + "/.well-known/openid-configuration")
        def discovery():
            return {"issuer": op.issuer, "authorization_endpoint": op.issuer + "/authorize",
                    "token_endpoint": op.issuer + "/token", "jwks_uri": op.issuer + "/jwks",
                    "response_types_supported": ["code"], "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "code_challenge_methods_supported": ["S256"],
                    "token_endpoint_auth_methods_supported": ["client_secret_basic", PRIVATE_KEY_JWT],
                    "authorization_response_iss_parameter_supported": True}

        @app.get(prefix + "/jwks")
        def keys():
            return op.jwks()

        def signed_in():
            name_ = op.sso.get(request.cookies.get("op_sso", ""))
            return op.users.get(name_) if name_ else None

        @app.route(prefix + "/authorize", methods=["GET", "POST"])
        def authorize():
            if request.method == "GET":
                op.authorize_requests.append(request.args.to_dict())
            user = signed_in()
            if request.method == "POST":
                u = op.users.get(request.form.get("username", ""))
                if u is None or not secrets.compare_digest(request.form.get("password", ""), u.password):
                    return _login_page(request.full_path, "Wrong user name or password."), 401
                user = u
            if user is None:
                return _login_page(request.full_path)
            try:
                grant = server.get_consent_grant(end_user=user)
            except OAuth2Error as e:
                return server.handle_error_response(None, e)
            resp = server.create_authorization_response(grant=grant, grant_user=user)
            if request.method == "POST":
                sso = secrets.token_urlsafe(16)
                op.sso[sso] = user.username
                resp.set_cookie("op_sso", sso, httponly=True, samesite="Lax", path=prefix)
            return resp

        @app.post(prefix + "/token")
        def token():
            op.token_requests.append({"form": request.form.to_dict(),
                                      "authorization": request.headers.get("Authorization")})
            return server.create_token_response()

        @app.get(prefix + "/logout")
        def logout():
            op.sso.pop(request.cookies.get("op_sso", ""), None)
            resp = make_response("signed out")
            resp.delete_cookie("op_sso", path=prefix)
            return resp

        return app


def _login_page(action, error=""):
    msg = f'<p role="alert">{html.escape(error)}</p>' if error else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>EHR sign-in</title></head>'
            f'<body><h1>Sign in to your health record</h1>{msg}'
            f'<form method="post" action="{html.escape(action)}">'
            f'<label for="username">User name</label> <input id="username" name="username" autocomplete="username">'
            f'<label for="password">Password</label> <input id="password" name="password" type="password">'
            f'<button type="submit" id="signin">Sign in</button></form></body></html>')

