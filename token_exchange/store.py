"""Named queries: the only module that builds SQL.

The request path reads configuration from an in-process ``Config`` snapshot,
reloaded when the CLI bumps the generation row (checked at most every
``reload_interval`` seconds), so no configuration query runs per request.
Patient links, revocations, assertion jtis and audit records are queried or
written directly: they are per-request facts.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's busy handler alone
    fcntl = None

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import keys as keymod
from . import scopes
from .models import (AdminEvent, AssertionJti, AuditEvent, BrowserSession, Client, Consent, ConsentTicket,
                     Generation, Issuer, MatchMemory, PatientLink, Revocation, SigningKey, Target,
                     Trust)
from .sealing import SealError, unseal


def _unseal_or_none(value, key_secret, what):
    """A secret sealed under another TOKEN_EXCHANGE_KEY_SECRET: log it and go without
    (the dependent request fails cleanly) rather than fail every request."""
    if not value:
        return None
    try:
        return unseal(value, key_secret)
    except SealError as e:
        log.error("cannot unseal a stored secret", extra={"what": what, "reason": str(e)})
        return None


# Hot-path statements, built once (Core on the tables: no ORM work per request).
_LINKS = PatientLink.__table__
_FIND_LINK = select(_LINKS.c.target_patient, _LINKS.c.origin, _LINKS.c.matched_at).where(
    _LINKS.c.source == bindparam("source"), _LINKS.c.patient == bindparam("patient"),
    _LINKS.c.target_id == bindparam("target_id"))
_INSERT_AUDIT = insert(AuditEvent.__table__)
_AUDIT_COLUMNS = [c.name for c in AuditEvent.__table__.c if c.name != "id"]
_CONSENT = Consent.__table__
# The active consent for one key: the ix_consent_key index (at most one row is active
# per key; the newest first should a race have left two).
_FIND_CONSENT = select(_CONSENT.c.id, _CONSENT.c.scopes, _CONSENT.c.expires).where(
    _CONSENT.c.issuer == bindparam("issuer"), _CONSENT.c.sub == bindparam("sub"),
    _CONSENT.c.client_id == bindparam("client_id"), _CONSENT.c.target_id == bindparam("target_id"),
    _CONSENT.c.source == bindparam("source"), _CONSENT.c.patient == bindparam("patient"),
    _CONSENT.c.withdrawn.is_(None)).order_by(_CONSENT.c.granted.desc())


log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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


@dataclass(frozen=True)
class TrustCfg:
    client_id: str
    issuer: str
    target_id: int
    scopes: scopes.ScopeSet
    upstream_client_id: str
    max_ttl: int | None
    allow_id_token: bool
    allow_jwt_grant: bool = False
    consent: str = "none"
    consent_max_days: int = 90
    consent_signer: str = "patient"


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

    def get_client_id(self):
        return self.client_id


@dataclass
class Config:
    generation: int
    issuers: dict  # url -> IssuerCfg
    targets_by_url: dict  # base_url -> TargetCfg
    targets_by_name: dict  # name -> TargetCfg
    targets_by_id: dict
    clients: dict  # client_id -> ClientCfg
    trusts: dict  # (client_id, issuer_url, target_id) -> TrustCfg
    trusts_by_client: dict  # client_id -> [TrustCfg]
    active_key: keymod.ActiveKey | None
    key_rows: list  # SigningKey rows (public parts) for /jwks

    @property
    def any_id_token_trust(self) -> bool:
        return any(t.allow_id_token for t in self.trusts.values())

    @property
    def any_jwt_grant_trust(self) -> bool:
        return any(t.allow_jwt_grant for t in self.trusts.values())


class Store:
    def __init__(self, engine, settings, accelerator=None):
        self.engine = engine
        self.settings = settings
        self.accel = accelerator
        self._config: Config | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._hot = _HotPath(engine)
        self.consents = ConsentQueries(engine, self._hot)
        dialect = engine.dialect
        self._matched_at = (_LINKS.c.matched_at.type.dialect_impl(dialect).result_processor(dialect, None)
                            or (lambda v: v))

    def close(self) -> None:
        """Release this thread's hot-path connection (shutdown, tests)."""
        self._hot.close()

    def changed(self) -> None:
        """A change was announced (Redis): reload on the next request."""
        self._checked = -1e9

    # -- configuration snapshot -------------------------------------------
    def config(self) -> Config:
        if self.accel is not None:
            self.accel.listen(self.changed)
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
        issuers, issuer_by_id = {}, {}
        for r in conn.execute(select(Issuer)).all():
            cfg = IssuerCfg(r.url, r.jwks_uri, tuple(r.algs), tuple(r.sources), tuple(r.audiences or ()),
                            r.patient_claim, r.source_claim, r.introspection_endpoint,
                            r.introspection_client_id,
                            _unseal_or_none(r.introspection_secret, secret, f"issuer {r.url}"),
                            tuple(r.identifier_systems or ()), r.identifier_claim, r.fhir_client_id,
                            r.fhir_scope, r.token_endpoint, r.authorization_endpoint, r.login_client_id,
                            _unseal_or_none(r.login_secret, secret, f"issuer {r.url} login"))
            issuers[r.url] = cfg
            issuer_by_id[r.id] = cfg
        targets = [TargetCfg(r.id, r.base_url, r.name, r.max_ttl, r.secret_salt, r.secret_hash,
                             tuple(r.match_identifiers or ()), r.match_ttl_days)
                   for r in conn.execute(select(Target)).all()]
        clients, client_by_id = {}, {}
        for r in conn.execute(select(Client)).all():
            c = ClientCfg(r.client_id, r.auth_method, r.secret_salt, r.secret_hash, r.jwks, r.jwks_uri, r.name,
                          tuple(r.redirect_uris or ()))
            clients[r.client_id] = c
            client_by_id[r.id] = c
        trusts, by_client = {}, {}
        for r in conn.execute(select(Trust)).all():
            t = TrustCfg(client_by_id[r.client_id].client_id, issuer_by_id[r.issuer_id].url, r.target_id,
                         scopes.parse(r.scopes, strict=False), r.upstream_client_id, r.max_ttl,
                         bool(r.allow_id_token), bool(r.allow_jwt_grant), r.consent, r.consent_max_days,
                         r.consent_signer)
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
            pem = _unseal_or_none(newest.private_key, secret, f"signing key {newest.kid}")
            active = keymod.ActiveKey(newest.kid, newest.alg, pem) if pem else None
        return Config(gen, issuers, {t.base_url: t for t in targets},
                      {t.name: t for t in targets if t.name}, {t.id: t for t in targets},
                      clients, trusts, by_client, active,
                      [_PublicKey(k.kid, k.alg, k.state, k.public_jwk, k.retired) for k in key_rows])

    # -- per-request facts -------------------------------------------------
    def find_link(self, source: str, patient: str, target_id: int):
        """(target_patient, origin, matched_at) or None: one indexed lookup (the
        (source, patient, target) unique index)."""
        row = self._hot.run(self._hot.find_link, {"source": source, "patient": patient, "target_id": target_id},
                            fetch=True)
        if row is not None and row[2] is not None and not isinstance(row[2], datetime):
            row = (row[0], row[1], self._matched_at(row[2]))  # SQLite's DBAPI gives the stored text
        return row

    def record_audit(self, event: dict) -> None:
        """Committed before the caller answers: a token issued always has its record.
        A token minted under a consent is found from its record (``jti`` with
        ``consent``, the partial index ix_audit_event_consent_jti), so introspection
        can follow the consent."""
        row = {c: event.get(c) for c in _AUDIT_COLUMNS}
        row["event"] = event.get("event") or "exchange"
        row["time"] = self._hot.time_bind(utcnow())
        self._hot.write(((self._hot.insert_audit, row),))

    def revoke(self, jti: str, exp: int) -> None:
        """Idempotent under concurrency (RFC 7009 §2.2: 200 every time): an insert that
        does nothing when the jti is already there (ON CONFLICT DO NOTHING, PostgreSQL
        and SQLite alike), never check-then-insert. Expired revocations are swept in
        a transaction of their own."""
        with self.engine.begin() as conn:
            conn.execute(_insert_or_ignore(conn.dialect.name, Revocation, ["jti"]).values(jti=jti, exp=exp))
        with self.engine.begin() as conn:
            conn.execute(delete(Revocation).where(Revocation.exp < int(time.time())))

    def is_revoked(self, jti: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(Revocation.jti).where(Revocation.jti == jti)).first() is not None

    def assertion_jti_spent(self, client_id: str, jti: str) -> bool:
        """Whether (client, jti) was spent and is still remembered (a read; nothing spent)."""
        if self.accel is not None and self.accel.jti_seen(client_id, jti):
            return True
        with self.engine.connect() as conn:
            return conn.execute(select(AssertionJti.jti).where(AssertionJti.client_id == client_id,
                                                               AssertionJti.jti == jti)).first() is not None

    def spend_assertion_jti(self, client_id: str, jti: str, exp: int) -> bool:
        """True the first time (client, jti) is seen while unexpired; False on replay.
        The database is the record; Redis, when configured, refuses known replays
        without touching it."""
        if self.accel is not None and self.accel.jti_seen(client_id, jti):
            return False
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(AssertionJti).where(AssertionJti.exp < int(time.time()) - 120))
                conn.execute(insert(AssertionJti).values(client_id=client_id, jti=jti, exp=exp))
        except IntegrityError:
            return False
        if self.accel is not None:
            self.accel.jti_spent(client_id, jti, exp - int(time.time()) + 120)
        return True

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    def audit_events(self, since=None, client=None, outcome=None, limit=None, event=None):
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

    def admin_events(self, since=None):
        q = select(AdminEvent).order_by(AdminEvent.id)
        if since is not None:
            q = q.where(AdminEvent.time >= since)
        with Session(self.engine) as s:
            return list(s.scalars(q))

    # -- patient matching (contract, "Patient matching at the target") ---------------
    def remembered_match(self, key: str) -> str | None:
        """The outcome ("none" or "ambiguous") of a match remembered under key, while unexpired."""
        with self.engine.connect() as conn:
            return conn.execute(select(MatchMemory.outcome).where(MatchMemory.key == key,
                                                                  MatchMemory.expires > int(time.time()))).scalar()

    def remember_match(self, key: str, outcome: str, seconds: int) -> None:
        """Remember a match's outcome for every instance (an upsert), and sweep expired ones."""
        now = int(time.time())
        with self.engine.begin() as conn:
            stmt = _dialect_insert(conn, MatchMemory).values(key=key, outcome=outcome, expires=now + seconds)
            conn.execute(stmt.on_conflict_do_update(index_elements=["key"],
                                                    set_={"outcome": outcome, "expires": now + seconds}))
            conn.execute(delete(MatchMemory).where(MatchMemory.expires <= now))

    def store_matched_link(self, source: str, patient: str, target_id: int, target_patient: str, system: str,
                           replace: bool, actor: str, detail: str) -> tuple:
        """Store a matched link and return the row now stored as (target_patient, origin).
        Insert if absent (ON CONFLICT DO NOTHING): of concurrent first matches one row
        is stored and every caller reads it back; a table link or a block stored
        meanwhile is never overwritten. ``replace``: a matched row (past its TTL) takes
        the new outcome. A row written here is an admin event (not a configuration
        change: the generation stays)."""
        key = (PatientLink.source == source, PatientLink.patient == patient, PatientLink.target_id == target_id)
        values = {"target_patient": target_patient, "system": system, "matched_at": utcnow()}
        with self.engine.begin() as conn:
            written = 0
            if replace:
                written = conn.execute(update(PatientLink).where(*key, PatientLink.origin == "matched")
                                       .values(**values)).rowcount
            if not written:
                stmt = _dialect_insert(conn, PatientLink).values(source=source, patient=patient, target_id=target_id,
                                                                 origin="matched", **values)
                written = conn.execute(stmt.on_conflict_do_nothing(index_elements=["source", "patient", "target_id"])
                                       .returning(PatientLink.id)).first() is not None
            if written:
                conn.execute(insert(AdminEvent).values(time=utcnow(), actor=actor, action="link.match",
                                                       detail=detail))
            row = conn.execute(select(PatientLink.target_patient, PatientLink.origin).where(*key)).first()
        return (row[0], row[1]) if row is not None else (None, "removed")

    def drop_matched_link(self, source: str, patient: str, target_id: int, matched_before, actor: str,
                          detail: str) -> None:
        """Delete a matched link (a rematch found none or several), only one matched
        before ``matched_before`` when given, so a fresh match by another instance
        stays. A link deleted here is an admin event."""
        cond = [PatientLink.source == source, PatientLink.patient == patient, PatientLink.target_id == target_id,
                PatientLink.origin == "matched"]
        if matched_before is not None:
            cond.append((PatientLink.matched_at < matched_before) | PatientLink.matched_at.is_(None))
        with self.engine.begin() as conn:
            if conn.execute(delete(PatientLink).where(*cond)).rowcount:
                conn.execute(insert(AdminEvent).values(time=utcnow(), actor=actor, action="link.unmatch",
                                                       detail=detail))

    def record_admin_event(self, actor: str, action: str, detail: str) -> None:
        """An admin event for something the service did itself (a search token minted):
        recorded, committed, without bumping the configuration generation."""
        with self.engine.begin() as conn:
            conn.execute(insert(AdminEvent).values(time=utcnow(), actor=actor, action=action, detail=detail))

    # -- admin changes (the CLI) --------------------------------------------
    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @staticmethod
    def bump(session: Session, actor: str, action: str, detail: str) -> None:
        """Record an admin change and tell running workers to reload."""
        session.execute(update(Generation).where(Generation.id == 1).values(value=Generation.value + 1))
        session.add(AdminEvent(time=utcnow(), actor=actor, action=action, detail=detail))

    @staticmethod
    def bump_conn(conn, actor: str, action: str, detail: str) -> None:
        """bump() for a Core connection (bulk imports)."""
        conn.execute(update(Generation).where(Generation.id == 1).values(value=Generation.value + 1))
        conn.execute(insert(AdminEvent).values(time=utcnow(), actor=actor, action=action, detail=detail))

    @staticmethod
    def count(session: Session, model) -> int:
        return session.execute(select(func.count()).select_from(model)).scalar()


class _HotPath:
    """The two statements every exchange runs (link lookup, audit insert), compiled
    once for the engine's dialect and run on a pooled DBAPI connection: the
    database does the same work, without SQLAlchemy's per-execute overhead.
    Driver errors surface as SQLAlchemy's DBAPIError (503 at the endpoint)."""

    def __init__(self, engine):
        from sqlalchemy import exc
        self.engine, self._exc = engine, exc
        dialect = engine.dialect
        self.find_link = self._compile(_FIND_LINK, dialect)
        self.find_consent = self._compile(_FIND_CONSENT, dialect)
        # what the ORM would make of a DateTime column read raw (SQLite returns text)
        self.time_result = (_CONSENT.c.expires.type.dialect_impl(dialect).result_processor(dialect, None)
                            or (lambda v: v))
        self.insert_audit = self._compile(
            insert(AuditEvent.__table__).values({c: bindparam(c) for c in _AUDIT_COLUMNS}), dialect)
        time_type = AuditEvent.__table__.c.time.type.dialect_impl(dialect)  # e.g. SQLite's DATETIME, as the ORM writes it
        self.time_bind = time_type.bind_processor(dialect) or (lambda v: v)
        # PostgreSQL: one connection per thread, so threads overlap their round trips.
        # SQLite: one connection per process, used by one thread at a time (a mutex):
        # its statements take microseconds, and every further connection in the
        # process would only add page-cache invalidations and lock traffic.
        self._local = threading.local() if dialect.name != "sqlite" else _ProcessLocal()
        self._mutex = threading.Lock() if dialect.name == "sqlite" else None
        # Threaded workers on SQLite: the audit writes of requests that arrive together
        # are committed together (one transaction, one writer-lock turn), each request
        # still waiting for its own record's commit before it answers.
        self.group = _GroupCommit(self) if dialect.name == "sqlite" and GROUP_COMMIT["threads"] else None
        path = engine.url.database if dialect.name == "sqlite" else None
        self._writer_lock_path = f"{path}-writer.lock" if fcntl and path and path != ":memory:" else None

    @staticmethod
    def _compile(stmt, dialect):
        compiled = stmt.compile(dialect=dialect)
        names = list(compiled.positiontup) if dialect.positional else None
        return compiled.string, names

    def close(self):
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()
        lock = getattr(self._local, "writer_lock", None)
        self._local.writer_lock = None
        if lock is not None:
            lock.close()

    def _take_writer_lock(self):
        """SQLite has one write lock per database, and a writer that finds it taken
        sleeps in SQLite's busy handler for 1 ms or more, then retries: with two
        workers writing an audit record per exchange that idles a core often. The
        writers here queue on flock(2) of a sidecar file instead, which hands the
        turn over the moment it is free. (Writers outside the hot path, e.g. the
        CLI, still meet SQLite's own lock and busy timeout, as before.) The lock
        only orders writers, so where it cannot be had (the file cannot be opened,
        the filesystem refuses flock) SQLite's busy handler orders them alone.
        Returns the locked file, or None."""
        lock = getattr(self._local, "writer_lock", None)
        try:
            if lock is None:  # private to the service's user, like the database (db.make_engine)
                fd = os.open(self._writer_lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                lock = self._local.writer_lock = os.fdopen(fd, "ab")
            fcntl.flock(lock, fcntl.LOCK_EX)
            return lock
        except OSError as e:
            log.warning("no writer lock; SQLite's busy handler alone orders writers",
                        extra={"path": self._writer_lock_path, "reason": e.strerror})
            self._writer_lock_path = None
            self._local.writer_lock = None
            if lock is not None:
                lock.close()
            return None

    def run(self, statement, params, fetch=False, commit=False):
        """Each thread keeps one DBAPI connection for these statements (no pool
        checkout per request). A failure drops it; one retry on a fresh connection
        covers a database that restarted since."""
        sql, names = statement
        args = tuple(params[n] for n in names) if names is not None else params
        return self._locked(((sql, args),), fetch, commit)

    def write(self, statements):
        """(statement, params)... committed as one before this returns: with group
        commit, in a transaction shared with other threads' writes."""
        work = [(sql, tuple(params[n] for n in names) if names is not None else params)
                for (sql, names), params in statements]
        if self.group is not None:
            return self.group.submit(work)
        return self._locked(work, False, True)

    def run_all(self, statements, fetch=False, commit=False):
        """Several (statement, params) in one transaction; the last one's row if fetch."""
        return self._locked([(sql, tuple(params[n] for n in names) if names is not None else params)
                             for (sql, names), params in statements], fetch, commit)

    def _locked(self, work, fetch, commit):
        if self._mutex is None:
            return self._flocked(work, fetch, commit)
        with self._mutex:
            return self._flocked(work, fetch, commit)

    def _flocked(self, work, fetch, commit):
        lock = self._take_writer_lock() if commit and self._writer_lock_path else None
        try:
            return self._run(work, fetch, commit)
        finally:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _run(self, work, fetch, commit):
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self.engine.raw_connection()
            try:
                cur = conn.cursor()
                for sql, args in work:
                    cur.execute(sql, args)
                row = cur.fetchone() if fetch else None
                cur.close()
                if commit:
                    conn.commit()
                return row
            except dbapi_error as e:
                sql, args = work[-1]
                if isinstance(e, self.engine.dialect.loaded_dbapi.IntegrityError):
                    # The statement, not the connection: undo this transaction (it may hold
                    # the write lock) and keep the connection.
                    try:
                        conn.rollback()
                    except dbapi_error:
                        self._drop(conn)
                    raise self._exc.DBAPIError.instance(sql, args, e, dbapi_error) from None
                self._drop(conn)
                if attempt == 2:
                    raise self._exc.DBAPIError.instance(sql, args, e, dbapi_error) from None

    def _drop(self, conn):
        """Forget a broken connection, closing it so it holds no lock."""
        self._local.conn = None
        try:
            conn.invalidate()
        except Exception:  # noqa: BLE001 - the connection is already gone
            pass


# Set by the threaded gunicorn worker (wsgi_server.ThreadWorker) before it loads the app.
GROUP_COMMIT = {"threads": False}


class _GroupCommit:
    """One writer thread per process that commits the audit records of every request
    waiting at that moment in one transaction. A request returns only once its own
    record is committed (or with the error that kept it from being), so the contract's
    "committed before the response" holds; under load a commit and a writer-lock turn
    serve several requests. When a shared transaction fails, each record is tried on
    its own, so one bad record never costs the others theirs."""

    def __init__(self, hot):
        self.hot = hot
        self.cv = threading.Condition()
        self.queue: list = []
        self.thread = None

    def submit(self, work) -> None:
        item = [work, threading.Event(), None]
        with self.cv:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, daemon=True, name="token-exchange-audit")
                self.thread.start()
            self.queue.append(item)
            self.cv.notify()
        item[1].wait()
        if item[2] is not None:
            raise item[2]

    def _loop(self):
        while True:
            with self.cv:
                while not self.queue:
                    self.cv.wait()
                batch, self.queue = self.queue, []
            try:
                self.hot._locked([w for item in batch for w in item[0]], False, True)
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                if len(batch) == 1:
                    batch[0][2] = e
                else:
                    for item in batch:
                        try:
                            self.hot._locked(item[0], False, True)
                        except Exception as one:  # noqa: BLE001
                            item[2] = one
            for item in batch:
                item[1].set()


class _ProcessLocal:
    """threading.local's interface, one value for the whole process (SQLite's shared
    hot-path connection and writer-lock file; guarded by _HotPath's mutex)."""


def _dialect_insert(conn, model):
    """The dialect's own INSERT (PostgreSQL, SQLite), which has ON CONFLICT."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert(model)


def _aware(dt: datetime | None) -> datetime | None:
    return dt if dt is None or dt.tzinfo else dt.replace(tzinfo=timezone.utc)


class ConsentQueries:
    """The consent flow's records (contract, "Consent for patient-facing apps"):
    consents (and denials), the tickets of consent_uris, the server-side state of
    browser flows, and the tokens minted under a consent. Everything a flow needs
    is here, so any instance can finish a flow another started."""

    def __init__(self, engine, hot: _HotPath):
        self.engine, self._hot = engine, hot

    # -- the exchange (hot path) -------------------------------------------------
    def find_active(self, issuer: str, sub: str, client_id: str, target_id: int, source: str, patient: str):
        """(id, scopes, expires epoch seconds) of the key's active consent, or None:
        one read on the ix_consent_key index."""
        row = self._hot.run(self._hot.find_consent, {
            "issuer": issuer, "sub": sub, "client_id": client_id, "target_id": target_id, "source": source,
            "patient": patient}, fetch=True)
        if row is None:
            return None
        return row[0], row[1], int(_aware(self._hot.time_result(row[2])).timestamp())

    def lapsed(self, jti: str, now: datetime) -> bool:
        """True when the token was minted under a consent that is now withdrawn or expired."""
        with self.engine.connect() as conn:
            row = conn.execute(select(Consent.withdrawn, Consent.expires)
                               .join_from(AuditEvent, Consent, AuditEvent.consent == Consent.id)
                               .where(AuditEvent.jti == jti, AuditEvent.consent.is_not(None))).first()
        return row is not None and (row.withdrawn is not None or _aware(row.expires) <= now)

    # -- tickets ------------------------------------------------------------------
    def create_ticket(self, ticket: dict) -> None:
        """Store a ticket (its hash, never the ticket); prune what has lapsed meanwhile."""
        now = int(time.time())
        with self.engine.begin() as conn:
            conn.execute(delete(ConsentTicket).where(ConsentTicket.expires < now))
            conn.execute(delete(BrowserSession).where(BrowserSession.expires < now))
            conn.execute(insert(ConsentTicket).values(**ticket))

    def ticket(self, ticket_hash: str):
        with self.engine.connect() as conn:
            return conn.execute(select(ConsentTicket).where(ConsentTicket.ticket_hash == ticket_hash)).first()

    def bind(self, ticket_hash: str, session_hash: str, data: dict, expires: int) -> bool:
        """Bind an unbound, unspent, unexpired ticket to a browser session and store the
        session, atomically; False when it is no longer free (another browser took it)."""
        with self.engine.begin() as conn:
            n = conn.execute(update(ConsentTicket).where(
                ConsentTicket.ticket_hash == ticket_hash, ConsentTicket.session_hash.is_(None),
                ConsentTicket.spent.is_(None), ConsentTicket.expires > int(time.time()))
                .values(session_hash=session_hash)).rowcount
            if n != 1:
                conn.rollback()
                return False
            conn.execute(delete(BrowserSession).where(BrowserSession.key == session_hash))
            conn.execute(insert(BrowserSession).values(key=session_hash, data=data, expires=expires))
        return True

    # -- browser sessions -----------------------------------------------------------
    def session(self, key_hash: str):
        """The session's data while it has not expired, else None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(BrowserSession.data).where(
                BrowserSession.key == key_hash, BrowserSession.expires > int(time.time()))).first()
        return row.data if row is not None else None

    def put_session(self, key_hash: str, data: dict, expires: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(BrowserSession).where(
                (BrowserSession.key == key_hash) | (BrowserSession.expires < int(time.time()))))
            conn.execute(insert(BrowserSession).values(key=key_hash, data=data, expires=expires))

    def claim_session(self, key_hash: str) -> bool:
        """Delete the session; True for the one caller that deleted it (a state is used once)."""
        with self.engine.begin() as conn:
            return conn.execute(delete(BrowserSession).where(BrowserSession.key == key_hash)).rowcount == 1

    def rotate_session(self, old_hash: str, new_hash: str, data: dict, expires: int,
                       ticket_hash: str | None = None) -> bool:
        """A new session key (at sign-in), moving the ticket's binding along; False
        when the ticket was meanwhile spent or bound elsewhere."""
        with self.engine.begin() as conn:
            conn.execute(delete(BrowserSession).where(BrowserSession.key == old_hash))
            if ticket_hash is not None:
                n = conn.execute(update(ConsentTicket).where(
                    ConsentTicket.ticket_hash == ticket_hash, ConsentTicket.session_hash == old_hash,
                    ConsentTicket.spent.is_(None)).values(session_hash=new_hash)).rowcount
                if n != 1:
                    return False
            conn.execute(insert(BrowserSession).values(key=new_hash, data=data, expires=expires))
        return True

    # -- decisions -------------------------------------------------------------------
    def decide(self, ticket_hash: str, session_hash: str, consent: dict, audit: dict) -> list | None:
        """Spend the ticket and record the decision (a consent, or a denial) with its
        audit event, in one transaction. A granted consent withdraws the key's older
        ones (each with its own audit event). Returns the ids withdrawn, or None when
        the ticket was already spent, expired or bound elsewhere (nothing recorded)."""
        now = consent["granted"]
        with self.engine.begin() as conn:
            n = conn.execute(update(ConsentTicket).where(
                ConsentTicket.ticket_hash == ticket_hash, ConsentTicket.session_hash == session_hash,
                ConsentTicket.spent.is_(None), ConsentTicket.expires > int(now.timestamp()))
                .values(spent=now)).rowcount
            if n != 1:
                conn.rollback()
                return None
            replaced = []
            if consent["decision"] == "granted":
                key = [getattr(Consent, k) == consent[k]
                       for k in ("issuer", "sub", "client_id", "target_id", "source", "patient")]
                replaced = conn.execute(select(Consent.id, Consent.scopes).where(
                    *key, Consent.withdrawn.is_(None))).all()
                if replaced:
                    conn.execute(update(Consent).where(Consent.id.in_([r.id for r in replaced]))
                                 .values(withdrawn=now))
            conn.execute(insert(Consent).values(**consent))
            for old in replaced:
                conn.execute(insert(AuditEvent).values(**dict(
                    audit, event="consent-withdrawn", consent=old.id, scope_granted=old.scopes, outcome="granted",
                    reason=f"replaced by consent {consent['id']}")))
            conn.execute(insert(AuditEvent).values(**audit))
        return [r.id for r in replaced]

    def withdraw(self, consent_id: str, audit: dict, issuer: str | None = None, sub: str | None = None,
                 admin: tuple | None = None):
        """Withdraw an active consent (the user's own when issuer and sub are given) and
        record it (and, by an admin, the admin event: (actor, action, detail)); the
        consent row, or None when there is no such active consent."""
        now = audit["time"]
        with self.engine.begin() as conn:
            q = (select(Consent.__table__, Target.base_url.label("target_url"))
                 .join(Target, Consent.target_id == Target.id)
                 .where(Consent.id == consent_id, Consent.withdrawn.is_(None), Consent.decision == "granted"))
            if issuer is not None:
                q = q.where(Consent.issuer == issuer, Consent.sub == sub)
            row = conn.execute(q).first()
            if row is None:
                return None
            n = conn.execute(update(Consent).where(Consent.id == consent_id, Consent.withdrawn.is_(None))
                             .values(withdrawn=now)).rowcount
            if n != 1:
                conn.rollback()
                return None
            conn.execute(insert(AuditEvent).values(**dict(
                audit, event="consent-withdrawn", consent=row.id, client_id=row.client_id, issuer=row.issuer,
                subject=row.sub, target=row.target_url, source_patient=row.patient or None,
                scope_granted=row.scopes, outcome="granted")))
            if admin is not None:
                actor, action, detail = admin
                conn.execute(insert(AdminEvent).values(time=now, actor=actor, action=action, detail=detail))
        return row

    # -- reading -----------------------------------------------------------------------
    def _select(self):
        return select(Consent, Target.base_url.label("target_url"), Target.name.label("target_name")).join(
            Target, Consent.target_id == Target.id)

    def active_for(self, issuer: str, sub: str, now: datetime) -> list:
        """The user's active consents (the ix_consent_key index: issuer, sub first)."""
        q = self._select().where(Consent.issuer == issuer, Consent.sub == sub, Consent.withdrawn.is_(None),
                                 Consent.expires > now).order_by(Consent.granted.desc())
        with Session(self.engine) as s:
            return list(s.execute(q))

    def listed(self, client_id: str | None = None, target_id: int | None = None, denials: bool = False) -> list:
        q = self._select().order_by(Consent.granted, Consent.id)
        if not denials:
            q = q.where(Consent.decision == "granted")
        if client_id is not None:
            q = q.where(Consent.client_id == client_id)
        if target_id is not None:
            q = q.where(Consent.target_id == target_id)
        with Session(self.engine) as s:
            return list(s.execute(q))

    def get(self, consent_id: str):
        with Session(self.engine) as s:
            return s.execute(self._select().where(Consent.id == consent_id)).first()


def _insert_or_ignore(dialect: str, model, conflict_columns):
    """INSERT ... ON CONFLICT (columns) DO NOTHING in the dialect's own insert."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert(model).on_conflict_do_nothing(index_elements=conflict_columns)


@dataclass(frozen=True)
class _PublicKey:
    kid: str
    alg: str
    state: str
    public_jwk: dict
    retired: datetime | None
