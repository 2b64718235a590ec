"""The trust snapshot: the configuration every request reads, as typed values.

Loaded from the database by ``store.config`` (``ConfigSnapshot``) and replaced as a
whole when an admin change bumps the generation; nothing here queries anything,
so any module can import these types to name what it is handed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from . import keys as keymod
from .revocation import RuleSet
from .scopes import ScopeSet


@dataclass(frozen=True)
class IssuerCfg:
    url: str
    jwks_uri: str
    algs: tuple
    sources: tuple
    audiences: tuple
    patient_claim: str
    source_claim: str
    introspection_endpoint: str | None
    introspection_client_id: str | None
    introspection_secret: str | None = field(repr=False)
    identifier_systems: tuple = ()
    identifier_claim: str = "patient_identifier"
    fhir_client_id: str | None = None
    fhir_scope: str | None = None
    token_endpoint: str | None = None
    authorization_endpoint: str | None = None
    login_client_id: str | None = None
    login_secret: str | None = field(default=None, repr=False)
    user_identifier_systems: tuple = ()
    user_identifier_claim: str = "fhirUser_identifier"


@dataclass(frozen=True)
class TargetCfg:
    id: int
    base_url: str
    name: str | None
    max_ttl: int | None
    secret_salt: str | None = field(repr=False)
    secret_hash: str | None = field(repr=False)
    match_identifiers: tuple = ()
    match_ttl_days: int = 30
    users: str = "as-is"  # as-is | mapped (contract, "The user at the target")
    user_match_identifiers: tuple = ()


@dataclass(frozen=True)
class TrustCfg:
    client_id: str
    issuer: str
    target_id: int
    scopes: ScopeSet
    upstream_client_id: str
    max_ttl: int | None
    allow_id_token: bool
    allow_jwt_grant: bool = False
    consent: str = "none"
    consent_max_days: int = 90
    consent_signer: str = "patient"
    require_dpop: bool = False  # `trust add|update --require-dpop`: only with a DPoP proof


@dataclass(frozen=True)
class ClientCfg:
    """A registered client, shaped as Authlib's ClientMixin where it needs one."""
    client_id: str
    auth_method: str
    secret_salt: str | None = field(repr=False)
    secret_hash: str | None = field(repr=False)
    jwks: dict | None = None
    jwks_uri: str | None = None
    name: str | None = None
    redirect_uris: tuple = ()
    disabled: bool = False  # `client disable`: refused at every endpoint
    require_dpop: bool = False  # `client add|update --require-dpop` (RFC 9449 §5.2 dpop_bound_access_tokens)

    def get_client_id(self):
        return self.client_id


@dataclass(frozen=True)
class PublicKey:
    """A signing key's public facts, as /jwks publishes them (``keys.published``)."""
    kid: str
    alg: str
    state: str
    public_jwk: dict
    retired: datetime | None


@dataclass
class Config:
    generation: int
    issuers: dict[str, IssuerCfg]  # url -> IssuerCfg
    targets_by_url: dict[str, TargetCfg]  # base_url -> TargetCfg
    targets_by_name: dict[str, TargetCfg]  # name -> TargetCfg
    targets_by_id: dict[int, TargetCfg]
    clients: dict[str, ClientCfg]  # client_id -> ClientCfg
    trusts: dict[tuple, TrustCfg]  # (client_id, issuer_url, target_id) -> TrustCfg
    trusts_by_client: dict[str, list[TrustCfg]]  # client_id -> [TrustCfg]
    active_key: keymod.ActiveKey | None
    key_rows: list[PublicKey]  # for /jwks
    # What TOKEN_EXCHANGE_KEY_SECRET could not unseal (e.g. "signing key K"): `serve` refuses
    # to start and /readyz answers 503 while it is not empty.
    unsealable: tuple = ()
    revocations: RuleSet = field(default_factory=RuleSet)  # `token revoke` and the removals that revoke

    @property
    def any_id_token_trust(self) -> bool:
        return any(t.allow_id_token for t in self.trusts.values())

    @property
    def any_jwt_grant_trust(self) -> bool:
        return any(t.allow_jwt_grant for t in self.trusts.values())
