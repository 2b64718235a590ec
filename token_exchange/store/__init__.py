"""Storage by capability: the only package that builds SQL.

- ``config``: the trust snapshot the request path reads (``ConfigSnapshot``),
  reloaded when an admin change bumps the generation row, so no configuration
  query runs per request;
- ``requests``: per-request facts (``PatientLinks``, ``Replay``,
  ``Revocations``, ``AuditLog``), queried or written directly;
- ``consent``: consent records (``ConsentQueries``);
- ``hotpath``: the precompiled statements of every exchange (``HotPath``), with
  group commit handed in by whoever builds the store; ``libpq``: its PostgreSQL
  writes sent now and collected later;
- ``admin``: the CLI's reads and writes (``Admin``);
- ``users``: user links (``UserLinks``; the CLI's ``UserLinkAdmin``).

``Store`` is the one object the rest of the service holds: it builds these from
an engine and delegates to them, under the names the request path calls.
``Store.open`` is the one wiring of engine, Redis and store (``create_app`` and
the CLI both use it).
"""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..clock import utcnow
from ..config import Config
from .admin import Admin
from .config import ConfigSnapshot
from .consent import ConsentQueries
from .hotpath import HotPath
from .requests import AuditLog, PatientLinks, Replay, Revocations
from .users import UserLinkAdmin, UserLinks

__all__ = ["Store", "ConsentQueries", "utcnow"]


class Store:
    def __init__(self, engine, settings, accelerator=None, *, group_commit: bool = False):
        """``accelerator``: the shared Redis client (``shared.Redis``), or None.
        ``group_commit``: threaded workers on SQLite commit the audit records of
        concurrent requests together (each still waits for its own)."""
        self.engine = engine
        self.settings = settings
        self.accel = accelerator
        self._hot = HotPath(engine, group_commit=group_commit)
        self.snapshot = ConfigSnapshot(engine, settings, accelerator)
        self.links = PatientLinks(engine, self._hot)
        self.replay = Replay(engine, accelerator)
        self.revocations = Revocations(engine)
        self.audit_log = AuditLog(engine, self._hot)
        self.consents = ConsentQueries(engine, self._hot)
        self.admin = Admin(engine)
        self.users = UserLinks(engine, self._hot)  # the user at the target
        self.user_admin = UserLinkAdmin(engine)

    @classmethod
    def open(cls, settings, *, group_commit: bool = False) -> Store:
        """The engine for ``settings.database_url``, the Redis client (when
        configured) and the store over them: the one place they are wired."""
        from ..db import make_engine
        from ..shared import Redis
        engine = make_engine(settings.database_url, create_folders=settings.database_is_default)
        redis = Redis(settings.redis_url, settings.database_url, settings.redis_prefix)
        return cls(engine, settings, redis, group_commit=group_commit)

    def close(self) -> None:
        """Release this thread's hot-path connection (shutdown, tests)."""
        self._hot.close()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    # -- configuration snapshot -------------------------------------------
    def config(self) -> Config:
        return self.snapshot.config()

    def changed(self) -> None:
        """A change was announced (Redis): reload on the next request."""
        self.snapshot.changed()

    def invalidate(self) -> None:
        self.snapshot.invalidate()

    # -- per-request facts -------------------------------------------------
    def find_link(self, source: str, patient: str, target_id: int, generation: int | None = None):
        """(target_patient, origin, matched_at) or None: one indexed lookup, or none for a
        table link or block already read under the snapshot ``generation``."""
        return self.links.find(source, patient, target_id, generation)

    def record_audit(self, event: dict) -> bool:
        """Committed before the caller answers: a token issued always has its record.
        An event with ``dpop_jti`` spends that DPoP proof's jti: False (and nothing
        written) when an earlier record spent it."""
        return self.send_audit(event).committed()

    def send_audit(self, event: dict) -> AuditRecording:
        """``record_audit`` in two halves, so the caller can work while the record is
        being committed: the insert starts now, ``committed()`` on the answer waits for it."""
        return AuditRecording(self.audit_log.send(event), event.get("dpop_jti") is not None)

    def revoke(self, jti: str, exp: int) -> None:
        self.revocations.revoke(jti, exp)

    def is_revoked(self, jti: str) -> bool:
        return self.revocations.is_revoked(jti)

    def token_origin(self, jti: str, iat: int) -> tuple | None:
        """(issuer, source patient, source user) of a minted token, from its audit record, or None."""
        return self.audit_log.origin(jti, iat)

    def assertion_jti_spent(self, client_id: str, jti: str) -> bool:
        """Whether (client, jti) was spent and is still remembered (a read; nothing spent)."""
        return self.replay.spent(client_id, jti)

    def spend_assertion_jti(self, client_id: str, jti: str, exp: int) -> bool:
        """True the first time (client, jti) is seen while unexpired; False on replay."""
        return self.replay.spend(client_id, jti, exp)

    def audit_events(self, since=None, client=None, outcome=None, limit=None, event=None):
        return self.audit_log.events(since, client, outcome, limit, event)

    def admin_events(self, since=None):
        return self.audit_log.admin_events(since)

    def record_admin_event(self, actor: str, action: str, detail: str) -> None:
        """An admin event for something the service did itself, without a generation bump."""
        self.audit_log.record_admin(actor, action, detail)

    # -- patient matching (contract, "Patient matching at the target") ---------------
    def remembered_match(self, key: str) -> str | None:
        return self.links.remembered_match(key)

    def remember_match(self, key: str, outcome: str, seconds: int) -> None:
        self.links.remember_match(key, outcome, seconds)

    def store_matched_link(self, source: str, patient: str, target_id: int, target_patient: str, system: str,
                           replace: bool, actor: str, detail: str) -> tuple:
        return self.links.store_matched(source, patient, target_id, target_patient, system, replace, actor, detail)

    def drop_matched_link(self, source: str, patient: str, target_id: int, matched_before, actor: str,
                          detail: str) -> None:
        self.links.drop_matched(source, patient, target_id, matched_before, actor, detail)


class AuditRecording:
    """An audit record being committed (Store.send_audit)."""
    __slots__ = ("_pending", "_spends_proof")

    def __init__(self, pending, spends_proof: bool):
        self._pending, self._spends_proof = pending, spends_proof

    def committed(self) -> bool:
        """Once the record is committed: True; False (nothing written) when it spends a
        DPoP proof's jti an earlier record spent. Any other failure raises."""
        try:
            self._pending.wait()
        except IntegrityError:
            if not self._spends_proof:
                raise
            return False
        return True
