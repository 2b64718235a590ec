"""token-exchange: OAuth 2.0 Token Exchange (RFC 8693) for SMART on FHIR."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Extension:
    """What the endpoints, the consent pages and the CLI reach through the app."""
    settings: object
    engine: object
    store: object
    pipeline: object  # POST /token
    authenticator: object  # client authentication (/token, /revoke)
    consent: object  # consent.service.ConsentService (the consent pages' sign-in)
    metrics: object
    jwks_cache: object
    nonces: object = None  # dpop.Nonces: the DPoP-Nonce every /token answer carries when nonces are on


def create_app(settings=None, env=None, *, group_commit=False):
    """Application factory: the one place that wires settings, stores, grants and their
    collaborators, the token pipeline, blueprints and error handling."""
    from flask import Flask

    from . import consent, endpoints, logs
    from .client_auth import Authenticator, ClientJWKS, PrivateKeyJWT, client_lookup
    from .dpop import Nonces, ProofChecker
    from .issuers import JWKSCache
    from .mapping.patients import PatientMapper, make_matcher
    from .mapping.users import UserMapper, make_user_matcher
    from .grants import Collaborators
    from .metrics import Metrics
    from .pipeline import TokenPipeline
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
    authenticator = Authenticator(client_lookup(store.config, settings.key_secret), assertion)
    consents = consent.init_app(app, settings, store, upstream)
    matcher = make_matcher(settings, store, upstream, metrics)
    patients = PatientMapper(store, matcher)
    users = UserMapper(store, make_user_matcher(settings, store, upstream, metrics, matcher.slots))
    deps = Collaborators(settings=settings, config=store.config, validator=validator, patients=patients,
                         consent=consents, replay=store.replay, users=users)
    nonces = Nonces(store.config)
    proofs = ProofChecker(settings, nonces)  # DPoP (RFC 9449); the audit record spends each proof's jti
    pipeline = TokenPipeline(settings, store, authenticator, deps, metrics, proofs)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    app.extensions["token_exchange"] = Extension(settings, engine, store, pipeline, authenticator, consents,
                                                 metrics, jwks_cache, nonces)
    app.register_blueprint(endpoints.bp)
    endpoints.register_error_handlers(app)
    endpoints.register_request_ids(app)
    app.wsgi_app = endpoints.TokenEndpoint(app.wsgi_app, app.extensions["token_exchange"])  # the hot path
    return app
