"""Every setting, its default and its environment variable; validated at start.

One source of truth: the rest of the code reads ``Settings``, never ``os.environ``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the variable."""


def _int(env, name, default, minimum=0):
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, not {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}")
    return value


# Each thread keeps a database connection for its hot-path statements; the engine's
# pool (db.make_engine: 5 + 10 overflow) must leave room for the others.
MAX_WORKER_THREADS = 12


def _bounded(env, name, default, minimum, maximum):
    value = _int(env, name, default, minimum)
    if value > maximum:
        raise SettingsError(f"{name} must be at most {maximum}")
    return value


MIN_KEY_SECRET = 32  # characters


def _key_secret(env) -> str | None:
    value = env.get("TOKEN_EXCHANGE_KEY_SECRET") or None
    if value is not None and len(value) < MIN_KEY_SECRET:
        raise SettingsError(f"TOKEN_EXCHANGE_KEY_SECRET must be at least {MIN_KEY_SECRET} characters; make one with "
                            "python3 -c 'import secrets; print(secrets.token_urlsafe(48))'")
    return value


def default_instance_path() -> str:
    """Where the default SQLite database lives, one place for the CLI and the server:
    ``<checkout>/instance`` when running from a source checkout (an editable install),
    else ``<sys.prefix>/var/token_exchange-instance`` (Flask's place for an installed
    package's instance folder)."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "setup.cfg").is_file() and (checkout / "migrations").is_dir():
        return str(checkout / "instance")
    return os.path.join(sys.prefix, "var", "token_exchange-instance")


_ON, _OFF = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def _switch(env, name, default: bool) -> bool:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    if raw.lower() in _ON:
        return True
    if raw.lower() in _OFF:
        return False
    raise SettingsError(f"{name} must be on or off, not {raw!r}")


def _redis_url(env):
    raw = env.get("TOKEN_EXCHANGE_REDIS_URL") or None
    if raw is not None:
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path):
            raise SettingsError("TOKEN_EXCHANGE_REDIS_URL must be a redis://, rediss:// or unix:// URL")
    return raw


@dataclass(frozen=True)
class Settings:
    #: TOKEN_EXCHANGE_DATABASE_URL: SQLAlchemy URL; default an SQLite file under instance/.
    database_url: str
    #: True when TOKEN_EXCHANGE_DATABASE_URL is unset: the default SQLite file, whose
    #: instance folder the service creates (a given URL's folder must exist).
    database_is_default: bool = False
    #: TOKEN_EXCHANGE_ISSUER: this service's issuer URL (iss of minted tokens, RFC 8414 issuer).
    issuer: str = "http://127.0.0.1:8000"
    #: TOKEN_EXCHANGE_TOKEN_TTL: the longest lifetime of a minted token, seconds.
    token_ttl: int = 300
    #: TOKEN_EXCHANGE_KEY_GRACE: how long a retired key stays in /jwks; default ttl + 60 s.
    key_grace: int = 360
    #: TOKEN_EXCHANGE_REDIS_URL: optional accelerator shared by instances.
    redis_url: str | None = None
    #: TOKEN_EXCHANGE_REDIS_PREFIX: key namespace in Redis; default derived from the database URL.
    redis_prefix: str | None = None
    #: TOKEN_EXCHANGE_KEY_SECRET: optional; encrypts private keys and outbound secrets at rest,
    #: peppers client-secret hashes.
    key_secret: str | None = field(default=None, repr=False)
    #: TOKEN_EXCHANGE_JWKS_CACHE_TTL: how long an issuer's JWKS is used before a refresh.
    jwks_cache_ttl: int = 300
    #: TOKEN_EXCHANGE_JWKS_STALE_MAX: how long cached keys keep serving while the issuer is down.
    jwks_stale_max: int = 86400
    #: TOKEN_EXCHANGE_JWKS_MIN_REFETCH: least seconds between two fetches of one issuer's JWKS.
    jwks_min_refetch: int = 10
    #: TOKEN_EXCHANGE_HTTP_TIMEOUT: seconds for any outbound call (JWKS, discovery, introspection).
    http_timeout: int = 5
    #: TOKEN_EXCHANGE_RELOAD_INTERVAL: seconds between checks for CLI changes (keys, config).
    reload_interval: float = 1.0
    #: TOKEN_EXCHANGE_RATE_LIMIT: exchanges per client per minute; 0 = off.
    rate_limit: int = 0
    #: TOKEN_EXCHANGE_METRICS: "on" to serve /metrics (default), "off" to hide it.
    metrics: bool = True
    #: request bodies above this are refused with 413 before parsing.
    max_body: int = 64 * 1024
    #: TOKEN_EXCHANGE_REQUEST_READ_TIMEOUT: seconds `serve` gives a client to send one whole
    #: request (line, headers and body); a slower client is disconnected.
    request_read_timeout: int = 10
    #: TOKEN_EXCHANGE_WORKER_THREADS: threads per `serve` worker process (gunicorn gthread).
    worker_threads: int = 8
    #: TOKEN_EXCHANGE_MATCH_CONCURRENCY: exchanges per worker process that may wait on a target
    #: or an EHR for patient matching at once; the rest answer 503 at once (default: worker
    #: threads - 2, at least 1, so /jwks and discovery always find a free thread).
    match_concurrency: int = 6
    #: TOKEN_EXCHANGE_DPOP_NONCE: "on" to require server nonces in DPoP proofs (RFC 9449 §8);
    #: every /token answer then carries a current DPoP-Nonce. Default off.
    dpop_nonce: bool = False

    @property
    def token_endpoint(self) -> str:
        return self.issuer.rstrip("/") + "/token"

    def __post_init__(self):
        base = self.issuer.rstrip("/")
        object.__setattr__(self, "_service_base", base)  # frozen: set once, here
        object.__setattr__(self, "_service_below", base + "/")

    def names_service(self, url: str) -> bool:
        """True when url is this service: its issuer URL, its token endpoint, or any URL
        under its issuer URL (tokens addressed here are grants, not access tokens)."""
        return isinstance(url, str) and (url.startswith(self._service_below) or url == self._service_base)

    @classmethod
    def from_env(cls, env=None, instance_path=None) -> Settings:
        env = os.environ if env is None else env
        issuer = env.get("TOKEN_EXCHANGE_ISSUER") or cls.issuer
        parts = urlsplit(issuer)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise SettingsError("TOKEN_EXCHANGE_ISSUER must be an http(s) URL without query or fragment")
        ttl = _int(env, "TOKEN_EXCHANGE_TOKEN_TTL", 300, minimum=1)
        threads = _bounded(env, "TOKEN_EXCHANGE_WORKER_THREADS", 8, 1, MAX_WORKER_THREADS)
        instance_path = instance_path or default_instance_path()
        db = env.get("TOKEN_EXCHANGE_DATABASE_URL") or f"sqlite:///{os.path.abspath(instance_path)}/token_exchange.db"
        return cls(
            database_url=db,
            database_is_default=not env.get("TOKEN_EXCHANGE_DATABASE_URL"),
            issuer=issuer.rstrip("/") if parts.path not in ("", "/") else f"{parts.scheme}://{parts.netloc}",
            token_ttl=ttl,
            key_grace=_int(env, "TOKEN_EXCHANGE_KEY_GRACE", ttl + 60),
            redis_url=_redis_url(env),
            redis_prefix=env.get("TOKEN_EXCHANGE_REDIS_PREFIX") or None,
            key_secret=_key_secret(env),
            jwks_cache_ttl=_int(env, "TOKEN_EXCHANGE_JWKS_CACHE_TTL", 300),
            jwks_stale_max=_int(env, "TOKEN_EXCHANGE_JWKS_STALE_MAX", 86400),
            jwks_min_refetch=_int(env, "TOKEN_EXCHANGE_JWKS_MIN_REFETCH", 10),
            http_timeout=_int(env, "TOKEN_EXCHANGE_HTTP_TIMEOUT", 5, minimum=1),
            reload_interval=float(_int(env, "TOKEN_EXCHANGE_RELOAD_INTERVAL", 1)),
            rate_limit=_int(env, "TOKEN_EXCHANGE_RATE_LIMIT", 0),
            metrics=_switch(env, "TOKEN_EXCHANGE_METRICS", True),
            request_read_timeout=_int(env, "TOKEN_EXCHANGE_REQUEST_READ_TIMEOUT", 10, minimum=1),
            worker_threads=threads,
            match_concurrency=_bounded(env, "TOKEN_EXCHANGE_MATCH_CONCURRENCY", max(1, threads - 2), 1, threads),
            dpop_nonce=_switch(env, "TOKEN_EXCHANGE_DPOP_NONCE", False),
        )
