"""token-exchange: OAuth 2.0 Token Exchange (RFC 8693) for SMART on FHIR."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Extension:
    settings: object
    engine: object
    store: object
    server: object
    metrics: object
    jwks_cache: object


def create_app(settings=None, env=None, *, group_commit=False):
    """Application factory: settings, database, authorization server, blueprint, CLI."""
    from flask import Flask

    from . import consent, endpoints, logs
    from .client_auth import ClientJWKS, PrivateKeyJWT
    from .issuers import JWKSCache
    from .matching import PatientMapper, make_matcher
    from .metrics import Metrics
    from .server import TokenExchangeServer
    from .settings import Settings
    from .store import Store
    from .subject import TokenValidator
    from .upstream import Upstream

    app = Flask(__name__)
    settings = settings or Settings.from_env(env)
    logs.configure()
    store = Store.open(settings, group_commit=group_commit)  # the engine, Redis and the store, wired once
    engine = store.engine
    metrics = Metrics()
    upstream = Upstream(settings, metrics)  # every outbound call: deadline, size cap, no cookies
    jwks_cache = JWKSCache(settings, upstream, metrics)
    validator = TokenValidator(jwks_cache, upstream, settings)
    assertion = PrivateKeyJWT(settings, store, ClientJWKS(settings, upstream, metrics))
    consents = consent.init_app(app, settings, store, upstream)
    patients = PatientMapper(store, make_matcher(settings, store, upstream, metrics))
    server = TokenExchangeServer(settings, store, validator, assertion_method=assertion, metrics=metrics,
                                 patients=patients, consent=consents)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    app.extensions["token_exchange"] = Extension(settings, engine, store, server, metrics, jwks_cache)
    app.register_blueprint(endpoints.bp)
    endpoints.register_error_handlers(app)
    endpoints.register_request_ids(app)
    app.wsgi_app = endpoints.TokenEndpoint(app.wsgi_app, app.extensions["token_exchange"])  # the hot path
    return app
