"""Consent for patient-facing apps (contract section of that name): the check on
the exchange (``service``), the browser flow and /consent (``views``), the OpenID
Connect sign-in at the EHR (``signin``) and its state sealed in a cookie
(``state``), the scopes in plain words (``words``) and the FHIR Consent export
(``fhir``)."""
from __future__ import annotations


def init_app(app, settings, store, upstream):
    """-> the ConsentService for TokenExchangeServer(consent=...); registers the pages.
    ``upstream`` is the app's one outbound client (token_exchange.upstream)."""
    from .service import ConsentService
    from .signin import SignIn
    from .state import SignInStates
    from .views import bp
    service = ConsentService(settings, store, SignIn(settings, upstream),
                             SignInStates(store.consents, settings.key_secret))
    app.register_blueprint(bp)
    return service
