"""The trust snapshot as the request path reads it: loaded whole from the
database, kept in process, and reloaded when the generation row moves (checked
at most every ``reload_interval`` seconds, at once when Redis announces a
change), so no configuration query runs per request."""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy import select

from .. import keys as keymod
from .. import scopes
from ..clock import aware, utcnow
from ..config import ClientCfg, Config, IssuerCfg, PublicKey, TargetCfg, TrustCfg
from ..models import Client, Generation, Issuer, RevocationRule, SigningKey, Target, Trust
from ..revocation import Rule, RuleSet
from ..sealing import SealError, unseal

log = logging.getLogger("token_exchange.store")


def _unseal_or_none(value, key_secret, what, failed: list):
    """A secret sealed under another TOKEN_EXCHANGE_KEY_SECRET: log it, note it in
    ``failed`` and go without (the dependent request fails cleanly) rather than fail
    every request."""
    if not value:
        return None
    try:
        return unseal(value, key_secret)
    except SealError as e:
        log.error("cannot unseal a stored secret", extra={"what": what, "reason": str(e)})
        failed.append(what)
        return None


class ConfigSnapshot:
    """The current ``Config``, reloaded when an admin change bumps the generation."""

    def __init__(self, engine, settings, redis=None):
        self.engine, self.settings, self.redis = engine, settings, redis
        self._config: Config | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def changed(self) -> None:
        """A change was announced (Redis): reload on the next request."""
        self._checked = -1e9

    def config(self) -> Config:
        if self.redis is not None:
            self.redis.listen(self.changed)
        now = time.monotonic()
        cfg = self._config
        if cfg is not None and now - self._checked < self.settings.reload_interval:
            return cfg
        with self._lock:
            if self._config is not None and now - self._checked < self.settings.reload_interval:
                return self._config
            with self.engine.connect() as conn:
                gen = conn.execute(select(Generation.value).where(Generation.id == 1)).scalar() or 0
                if self._config is None or self._config.generation != gen:
                    self._config = self._load(conn, gen)
            self._checked = now
            return self._config

    def invalidate(self):
        with self._lock:
            self._config = None

    def _load(self, conn, gen) -> Config:
        secret = self.settings.key_secret
        failed = []
        issuers, issuer_by_id = {}, {}
        for r in conn.execute(select(Issuer)).all():
            cfg = IssuerCfg(r.url, r.jwks_uri, tuple(r.algs), tuple(r.sources), tuple(r.audiences or ()),
                            r.patient_claim, r.source_claim, r.introspection_endpoint,
                            r.introspection_client_id,
                            _unseal_or_none(r.introspection_secret, secret, f"issuer {r.url}", failed),
                            tuple(r.identifier_systems or ()), r.identifier_claim, r.fhir_client_id,
                            r.fhir_scope, r.token_endpoint, r.authorization_endpoint, r.login_client_id,
                            _unseal_or_none(r.login_secret, secret, f"issuer {r.url} login", failed),
                            tuple(r.user_identifier_systems or ()), r.user_identifier_claim)
            issuers[r.url] = cfg
            issuer_by_id[r.id] = cfg
        targets = [TargetCfg(r.id, r.base_url, r.name, r.max_ttl, r.secret_salt, r.secret_hash,
                             tuple(r.match_identifiers or ()), r.match_ttl_days, r.users,
                             tuple(r.user_match_identifiers or ()))
                   for r in conn.execute(select(Target)).all()]
        clients, client_by_id = {}, {}
        for r in conn.execute(select(Client)).all():
            c = ClientCfg(r.client_id, r.auth_method, r.secret_salt, r.secret_hash, r.jwks, r.jwks_uri, r.name,
                          tuple(r.redirect_uris or ()), bool(r.disabled), bool(r.require_dpop))
            clients[r.client_id] = c
            client_by_id[r.id] = c
        trusts, by_client = {}, {}
        for r in conn.execute(select(Trust)).all():
            t = TrustCfg(client_by_id[r.client_id].client_id, issuer_by_id[r.issuer_id].url, r.target_id,
                         scopes.parse(r.scopes, strict=False), r.upstream_client_id, r.max_ttl,
                         bool(r.allow_id_token), bool(r.allow_jwt_grant), r.consent, r.consent_max_days,
                         r.consent_signer, bool(r.require_dpop))
            trusts[(t.client_id, t.issuer, t.target_id)] = t
            by_client.setdefault(t.client_id, []).append(t)
        key_rows = conn.execute(select(SigningKey.kid, SigningKey.alg, SigningKey.state, SigningKey.public_jwk,
                                       SigningKey.retired, SigningKey.activated, SigningKey.private_key)
                                .where(SigningKey.state.in_(("staged", "active", "retired")))
                                .order_by(SigningKey.id)).all()
        active = None
        actives = [k for k in key_rows if k.state == "active"]
        if actives:
            newest = max(actives, key=lambda k: (k.activated or k.retired or utcnow()))
            pem = _unseal_or_none(newest.private_key, secret, f"signing key {newest.kid}", failed)
            active = keymod.ActiveKey(newest.kid, newest.alg, pem) if pem else None
        return Config(gen, issuers, {t.base_url: t for t in targets},
                      {t.name: t for t in targets if t.name}, {t.id: t for t in targets},
                      clients, trusts, by_client, active,
                      [PublicKey(k.kid, k.alg, k.state, k.public_jwk, k.retired) for k in key_rows],
                      tuple(failed), RuleSet(self._rules(conn), issuers))

    def _rules(self, conn) -> list:
        """The revocation rules that may still cover a token: those newer than the
        longest a token lives (the TTL, and at least a day: an instance with a longer
        TTL may have minted it). Rules are few (one per command), so they come with
        the snapshot, and a new one bumps the generation like any admin change."""
        horizon = max(86400, self.settings.token_ttl + 60, self.settings.key_grace)
        since = utcnow() - timedelta(seconds=horizon)
        rows = conn.execute(select(RevocationRule).where(RevocationRule.time > since)).all()
        return [Rule(r.kind, aware(r.time).timestamp(), r.client_id, r.issuer, r.target, r.source, r.patient,
                     r.fhir_user) for r in rows]
