"""Per-request facts, queried or written directly (they are not configuration):
patient links and remembered match outcomes, spent assertion jtis (replay),
revocations, and the audit log."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import audit
from ..clock import utcnow
from ..models import AdminEvent, AssertionJti, AuditEvent, MatchMemory, PatientLink, Revocation
from .hotpath import AUDIT_COLUMNS, HotPath, Pending


def dialect_insert(dialect_name: str, model):
    """The dialect's own INSERT (PostgreSQL, SQLite), which has ON CONFLICT."""
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as own_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as own_insert
    return own_insert(model)


def store_matched_row(engine, model, key: dict, answer: str, value: str, system: str, replace: bool, actor: str,
                      action: str, detail: str) -> tuple:
    """Store a matched link of ``model`` (PatientLink, UserLink) at ``key`` (its unique
    columns) answering ``value`` in column ``answer``; return the row now stored as
    (answer, origin), (None, "removed") when none is. Insert if absent (ON CONFLICT DO
    NOTHING): of concurrent first matches one row is stored and every caller reads it
    back; a table link or a block stored meanwhile is never overwritten. ``replace``: a
    matched row (past its TTL) takes the new outcome. A row written here is an admin
    event ``action`` (not a configuration change: the generation stays)."""
    where = [getattr(model, column) == v for column, v in key.items()]
    values = {answer: value, "system": system, "matched_at": utcnow()}
    with engine.begin() as conn:
        written = 0
        if replace:
            written = conn.execute(update(model).where(*where, model.origin == "matched").values(**values)).rowcount
        if not written:
            stmt = dialect_insert(conn.dialect.name, model).values(**key, origin="matched", **values)
            written = conn.execute(stmt.on_conflict_do_nothing(index_elements=list(key))
                                   .returning(model.id)).first() is not None
        if written:
            conn.execute(insert(AdminEvent).values(**audit.admin(actor, action, detail)))
        row = conn.execute(select(getattr(model, answer), model.origin).where(*where)).first()
    return (row[0], row[1]) if row is not None else (None, "removed")


def drop_matched_row(engine, model, key: dict, matched_before, actor: str, action: str, detail: str) -> None:
    """Delete the matched link of ``model`` at ``key`` (a rematch found none or several),
    only one matched before ``matched_before`` when given, so a fresh match by another
    instance stays. A link deleted here is an admin event ``action``."""
    cond = [getattr(model, column) == v for column, v in key.items()] + [model.origin == "matched"]
    if matched_before is not None:
        cond.append((model.matched_at < matched_before) | model.matched_at.is_(None))
    with engine.begin() as conn:
        if conn.execute(delete(model).where(*cond)).rowcount:
            conn.execute(insert(AdminEvent).values(**audit.admin(actor, action, detail)))


class KeptLinks:
    """Links only an admin command changes (table links and blocks), patients' or users',
    kept in memory per configuration generation: each such change bumps the generation
    in its own transaction, so a link read under the generation of the trust snapshot a
    request decides under stays true until the snapshot moves (an admin change reaches
    links and trusts together). Matched links (which any instance's matching writes
    without a bump) and absent links are always read from the database."""

    ADMIN_ORIGINS = ("table", "blocked")
    LIMIT = 10_000  # links kept per process (the oldest dropped first)

    def __init__(self):
        self._kept: tuple = (None, {})  # (generation, {key: row}), replaced whole

    def get(self, key, generation):
        kept_gen, kept = self._kept
        return kept.get(key) if generation is not None and kept_gen == generation else None

    def keep(self, key, row, generation) -> None:
        if generation is None or row is None or row[1] not in self.ADMIN_ORIGINS:
            return
        kept_gen, kept = self._kept
        if kept_gen != generation:  # read under another generation: start over under this one
            kept = {}
            self._kept = (generation, kept)
        if len(kept) >= self.LIMIT:
            try:
                del kept[next(iter(kept))]
            except (KeyError, RuntimeError, StopIteration):  # another thread got there first
                pass
        kept[key] = tuple(row)


class PatientLinks:
    """Who is who at the target, as stored: links (table, matched, blocked) and the
    remembered outcomes of matches that found none or several (contract, "Patient
    matching at the target")."""

    def __init__(self, engine, hot: HotPath):
        self.engine, self._hot = engine, hot
        self._kept = KeptLinks()

    def find(self, source: str, patient: str, target_id: int, generation: int | None = None):
        """(target_patient, origin, matched_at) or None: one indexed lookup (the
        (source, patient, target) unique index), or none for a table link or block read
        under the snapshot ``generation`` already (``KeptLinks``)."""
        key = (source, patient, target_id)
        row = self._kept.get(key, generation)
        if row is not None:
            return row
        row = self._hot.run(self._hot.find_link, {"source": source, "patient": patient, "target_id": target_id},
                            fetch=True)
        if row is not None and row[2] is not None and not isinstance(row[2], datetime):
            row = (row[0], row[1], self._hot.matched_at_result(row[2]))  # SQLite's DBAPI gives the stored text
        self._kept.keep(key, row, generation)
        return row

    def remembered_match(self, key: str) -> str | None:
        """The outcome ("none" or "ambiguous") of a match remembered under key, while unexpired."""
        with self.engine.connect() as conn:
            return conn.execute(select(MatchMemory.outcome).where(MatchMemory.key == key,
                                                                  MatchMemory.expires > int(time.time()))).scalar()

    def remember_match(self, key: str, outcome: str, seconds: int) -> None:
        """Remember a match's outcome for every instance (an upsert), and sweep expired ones."""
        now = int(time.time())
        with self.engine.begin() as conn:
            stmt = dialect_insert(conn.dialect.name, MatchMemory).values(key=key, outcome=outcome,
                                                                         expires=now + seconds)
            conn.execute(stmt.on_conflict_do_update(index_elements=["key"],
                                                    set_={"outcome": outcome, "expires": now + seconds}))
            conn.execute(delete(MatchMemory).where(MatchMemory.expires <= now))

    def store_matched(self, source: str, patient: str, target_id: int, target_patient: str, system: str,
                      replace: bool, actor: str, detail: str) -> tuple:
        """Store a matched link (insert if absent, ``store_matched_row``); return the row now
        stored as (target_patient, origin)."""
        key = {"source": source, "patient": patient, "target_id": target_id}
        return store_matched_row(self.engine, PatientLink, key, "target_patient", target_patient, system, replace,
                                 actor, "link.match", detail)

    def drop_matched(self, source: str, patient: str, target_id: int, matched_before, actor: str,
                     detail: str) -> None:
        """Delete a matched link (a rematch found none or several): ``drop_matched_row``."""
        drop_matched_row(self.engine, PatientLink, {"source": source, "patient": patient, "target_id": target_id},
                         matched_before, actor, "link.unmatch", detail)


class Replay:
    """Spent client-assertion jtis (RFC 7523 §3 rule 7) and JWT-grant jtis. The
    database is the record; Redis, when configured, refuses known replays without
    touching it. (A DPoP proof's jti is spent by the audit record of its request:
    AuditEvent.dpop_jti, unique per proof key.)"""

    def __init__(self, engine, redis=None):
        self.engine, self.redis = engine, redis

    def spent(self, client_id: str, jti: str) -> bool:
        """Whether (client, jti) was spent and is still remembered (a read; nothing spent)."""
        if self.redis is not None and self.redis.jti_seen(client_id, jti):
            return True
        with self.engine.connect() as conn:
            return conn.execute(select(AssertionJti.jti).where(AssertionJti.client_id == client_id,
                                                               AssertionJti.jti == jti)).first() is not None

    def spend(self, client_id: str, jti: str, exp: int) -> bool:
        """True the first time (client, jti) is seen while unexpired; False on replay."""
        if self.redis is not None and self.redis.jti_seen(client_id, jti):
            return False
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(AssertionJti).where(AssertionJti.exp < int(time.time()) - 120))
                conn.execute(insert(AssertionJti).values(client_id=client_id, jti=jti, exp=exp))
        except IntegrityError:
            return False
        if self.redis is not None:
            self.redis.jti_spent(client_id, jti, exp - int(time.time()) + 120)
        return True


class Revocations:
    """Revoked token jtis (RFC 7009), kept until the token would have expired."""

    def __init__(self, engine):
        self.engine = engine

    def revoke(self, jti: str, exp: int) -> None:
        """Idempotent under concurrency (RFC 7009 §2.2: 200 every time): an insert that
        does nothing when the jti is already there (ON CONFLICT DO NOTHING, PostgreSQL
        and SQLite alike), never check-then-insert. Expired revocations are swept in
        a transaction of their own."""
        with self.engine.begin() as conn:
            conn.execute(dialect_insert(conn.dialect.name, Revocation).on_conflict_do_nothing(index_elements=["jti"])
                         .values(jti=jti, exp=exp))
        with self.engine.begin() as conn:
            conn.execute(delete(Revocation).where(Revocation.exp < int(time.time())))

    def is_revoked(self, jti: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(Revocation.jti).where(Revocation.jti == jti)).first() is not None


class AuditLog:
    """The audit records of decisions (audit_event) and of admin changes
    (admin_event): written committed, read oldest first."""

    def __init__(self, engine, hot: HotPath):
        self.engine, self._hot = engine, hot

    def send(self, event: dict) -> Pending:
        """The record's insert, started: committed once ``wait()`` on the answer returns,
        which the caller does before it answers (a token issued always has its record).
        A token minted under a consent is found from its record (``jti`` with
        ``consent``, the partial index ix_audit_event_consent_jti), so introspection
        can follow the consent. A record with ``dpop_jti`` spends that DPoP proof's jti
        (IntegrityError, nothing written, when a record spent it already)."""
        row = {c: event.get(c) for c in AUDIT_COLUMNS}
        for c, v in row.items():  # PostgreSQL's text cannot hold NUL: U+FFFD stands in its place (every back end)
            if v.__class__ is str and "\x00" in v:
                row[c] = v.replace("\x00", "\ufffd")
        row["event"] = event.get("event") or "exchange"
        row["time"] = self._hot.time_bind(utcnow())
        return self._hot.send(((self._hot.insert_audit, row),))

    def record_admin(self, actor: str, action: str, detail: str) -> None:
        """An admin event for something the service did itself (a search token minted):
        recorded, committed, without bumping the configuration generation."""
        with self.engine.begin() as conn:
            conn.execute(insert(AdminEvent).values(**audit.admin(actor, action, detail)))

    def events(self, since=None, client=None, outcome=None, limit=None, event=None) -> list:
        q = select(AuditEvent).order_by(AuditEvent.id)
        if event:
            q = q.where(AuditEvent.event == event)
        if since is not None:
            q = q.where(AuditEvent.time >= since)
        if client:
            q = q.where(AuditEvent.client_id == client)
        if outcome:
            q = q.where(AuditEvent.outcome == outcome)
        if limit:
            q = q.limit(limit)
        with Session(self.engine) as s:
            return list(s.scalars(q))

    def origin(self, jti: str, iat: int) -> tuple | None:
        """(issuer, source patient, source user) of the token minted with this jti, from its granted
        exchange record, or None. The record is written as the token is minted, so it
        lies in [iat, iat + 2 min): the time index bounds the search to that window
        (no index on jti: the exchange's insert stays as cheap as it was)."""
        start = datetime.fromtimestamp(iat, timezone.utc)
        q = (select(AuditEvent.issuer, AuditEvent.source_patient, AuditEvent.source_user)
             .where(AuditEvent.time >= start, AuditEvent.time < start + timedelta(seconds=120),
                    AuditEvent.jti == jti, AuditEvent.outcome == "granted").limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return (row[0], row[1], row[2]) if row is not None else None

    def admin_events(self, since=None) -> list:
        q = select(AdminEvent).order_by(AdminEvent.id)
        if since is not None:
            q = q.where(AdminEvent.time >= since)
        with Session(self.engine) as s:
            return list(s.scalars(q))
