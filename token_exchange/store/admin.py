"""Admin reads and writes: the SQL of every `token-exchange` command.

A command opens one ``AdminChange`` (a unit of work), looks up and changes the
configuration rows it needs, and commits: the change, its admin event and a
bump of the generation row (so running workers reload) in one transaction. The
patient-link table's bulk import and its listings are here too (``LinkImport``,
``Admin.links``). Nothing here decides anything; the CLI checks its arguments
and says what happened.
"""
from __future__ import annotations

from contextlib import contextmanager

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import audit
from ..clock import utcnow
from ..models import (AdminEvent, AuditEvent, Client, Consent, Generation, Issuer, PatientLink, Revocation,
                      RevocationRule, SigningKey, Target, Trust, UserLink)
from .requests import dialect_insert


class Conflict(Exception):
    """The commit broke a constraint (a record made meanwhile): nothing was changed."""


def bump(session: Session, actor: str, action: str, detail: str) -> None:
    """Record an admin change and tell running workers to reload (a generation bump)."""
    session.execute(update(Generation).where(Generation.id == 1).values(value=Generation.value + 1))
    session.add(AdminEvent(**audit.admin(actor, action, detail)))


def bump_conn(conn, actor: str, action: str, detail: str) -> None:
    """bump() for a Core connection (bulk imports)."""
    conn.execute(update(Generation).where(Generation.id == 1).values(value=Generation.value + 1))
    conn.execute(insert(AdminEvent).values(**audit.admin(actor, action, detail)))


class AdminChange:
    """One command's unit of work on the configuration rows (issuers, clients,
    targets, trusts, signing keys, table links). Rows read here stay usable after
    the commit (no expiry), so a command can report what it changed."""

    def __init__(self, engine):
        self.session = Session(engine, expire_on_commit=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.session.close()
        return False

    # -- lookups ---------------------------------------------------------------
    def issuer(self, url: str) -> Issuer | None:
        return self.session.scalars(select(Issuer).where(Issuer.url == url)).first()

    def client(self, client_id: str) -> Client | None:
        return self.session.scalars(select(Client).where(Client.client_id == client_id)).first()

    def target(self, ref: str) -> Target | None:
        """A target by its base URL or its registered name."""
        return self.session.scalars(select(Target).where((Target.base_url == ref) | (Target.name == ref))).first()

    def trust(self, client: Client, issuer: Issuer, target: Target) -> Trust | None:
        return self.session.scalars(select(Trust).where(Trust.client_id == client.id, Trust.issuer_id == issuer.id,
                                                        Trust.target_id == target.id)).first()

    def link(self, source: str, patient: str, target_id: int) -> PatientLink | None:
        return self.session.scalars(select(PatientLink).where(PatientLink.source == source,
                                                              PatientLink.patient == patient,
                                                              PatientLink.target_id == target_id)).first()

    def has_issuer(self, url: str) -> bool:
        return self.session.execute(select(Issuer.id).where(Issuer.url == url)).first() is not None

    def has_client(self, client_id: str) -> bool:
        return self.session.execute(select(Client.id).where(Client.client_id == client_id)).first() is not None

    def has_target(self, base_url: str) -> bool:
        return self.session.execute(select(Target.id).where(Target.base_url == base_url)).first() is not None

    def target_name_taken(self, name: str, other_than: int | None = None) -> bool:
        """Whether another target (not ``other_than``, the one being changed) has this name."""
        q = select(Target.id).where(Target.name == name)
        if other_than:
            q = q.where(Target.id != other_than)
        return self.session.execute(q).first() is not None

    def has_trust(self, client: Client, issuer: Issuer, target: Target) -> bool:
        return self.session.execute(select(Trust.id).where(
            Trust.client_id == client.id, Trust.issuer_id == issuer.id, Trust.target_id == target.id)).first() \
            is not None

    def active_key_alg(self) -> str | None:
        """The algorithm of the active signing key (the newest, should there be two), or None."""
        return self.session.scalars(select(SigningKey.alg).where(SigningKey.state == "active")
                                    .order_by(SigningKey.id.desc())).first()

    def staged_key(self) -> SigningKey | None:
        """The staged signing key (the oldest, should there be two), or None."""
        return self.session.scalars(select(SigningKey).where(SigningKey.state == "staged")
                                    .order_by(SigningKey.id)).first()

    def keys(self, state: str | None = None) -> list:
        """The signing keys (of one state), oldest first."""
        q = select(SigningKey).order_by(SigningKey.id)
        if state is not None:
            q = q.where(SigningKey.state == state)
        return list(self.session.scalars(q))

    def issuers(self) -> list:
        return list(self.session.scalars(select(Issuer).order_by(Issuer.url)))

    def sealed(self) -> list:
        """(what, row, attribute) of every stored value sealed under the key secret: the
        signing keys' private keys and the issuers' outbound secrets."""
        out = [(f"signing key {k.kid}", k, "private_key") for k in self.keys()]
        for i in self.issuers():
            out += [(f"issuer {i.url}{what}", i, attr) for attr, what in
                    (("introspection_secret", ""), ("login_secret", " login secret")) if getattr(i, attr)]
        return out

    def clients(self) -> list:
        return list(self.session.scalars(select(Client).order_by(Client.client_id)))

    def targets(self) -> list:
        return list(self.session.scalars(select(Target).order_by(Target.base_url)))

    def trusts(self, client_id: str | None = None) -> list:
        """(client id, issuer URL, target base URL, Trust) of every trust (of one client)."""
        q = self.trusts_query().order_by(Client.client_id, Issuer.url, Target.base_url)
        if client_id:
            q = q.where(Client.client_id == client_id)
        return list(self.session.execute(q))

    @staticmethod
    def trusts_query():
        return (select(Client.client_id, Issuer.url, Target.base_url, Trust)
                .join(Client, Trust.client_id == Client.id).join(Issuer, Trust.issuer_id == Issuer.id)
                .join(Target, Trust.target_id == Target.id))

    @staticmethod
    def _trust_column(row):
        return Trust.issuer_id if isinstance(row, Issuer) else Trust.client_id

    def trust_count(self, row: Issuer | Client) -> int:
        """How many trusts name this issuer or client."""
        return self.session.execute(select(func.count()).select_from(Trust)
                                    .where(self._trust_column(row) == row.id)).scalar()

    def target_dependents(self, target: Target) -> dict:
        """How many trusts, patient links, consents and user links name this target."""
        return {name: self.session.execute(select(func.count()).select_from(model)
                                           .where(model.target_id == target.id)).scalar()
                for name, model in (("trusts", Trust), ("links", PatientLink), ("consents", Consent),
                                    ("user_links", UserLink))}

    # -- changes ----------------------------------------------------------------
    def add(self, row) -> None:
        self.session.add(row)

    def remove(self, row) -> None:
        self.session.delete(row)

    def flush(self) -> None:
        self.session.flush()

    def remove_with_trusts(self, row: Issuer | Client) -> None:
        """An issuer or a client and every trust that names it (the tokens minted under
        those trusts revoked)."""
        self.revoke_trusts(self._trust_column(row) == row.id)
        self.session.execute(delete(Trust).where(self._trust_column(row) == row.id))
        self.session.delete(row)

    def remove_target(self, target: Target) -> None:
        """A target and its trusts (the tokens minted under them revoked), patient links,
        consents and user links."""
        self.revoke_trusts(Trust.target_id == target.id)
        for model in (Trust, PatientLink, Consent, UserLink):
            self.session.execute(delete(model).where(model.target_id == target.id))
        self.session.delete(target)

    def remove_trust(self, client: Client, issuer: Issuer, target: Target) -> int:
        """The trust's row deleted: 1, or 0 when there is none."""
        return self.session.execute(delete(Trust).where(Trust.client_id == client.id, Trust.issuer_id == issuer.id,
                                                        Trust.target_id == target.id)).rowcount

    # -- revocation (`token revoke`, and the removals that revoke) -------------------
    def add_rule(self, kind: str, time, **fields) -> None:
        """A revocation rule: tokens it covers issued before ``time`` introspect inactive
        (``revocation.RuleSet``; every instance loads it with the snapshot)."""
        self.session.add(RevocationRule(kind=kind, time=time, **fields))

    def revoke_trusts(self, where) -> None:
        """A `trust` rule, now, for each trust ``where`` selects: what `trust remove` adds
        for one, added by every removal that deletes trusts with it."""
        now = utcnow()
        for client_id, issuer, target, _ in self.session.execute(
                self.trusts_query().where(where)):
            self.add_rule("trust", now, client_id=client_id, issuer=issuer, target=target)

    def revoke_jti(self, jti: str, exp: int) -> None:
        """One token by its jti, as POST /revoke does (kept until ``exp``)."""
        self.session.execute(dialect_insert(self.session.get_bind().dialect.name, Revocation)
                             .on_conflict_do_nothing(index_elements=["jti"]).values(jti=jti, exp=exp))

    def vouching_issuers(self, source: str) -> list:
        """The URLs of the issuers that vouch for this source FHIR base."""
        return [url for url, sources in self.session.execute(select(Issuer.url, Issuer.sources))
                if source in (sources or ())]

    def grants_covered(self, before, *, jti=None, client_id=None, issuer=None, target=None, issuers=None,
                       patient=None, fhir_user=None) -> int | None:
        """How many granted exchange records (tokens minted) a rule covers: issued before
        ``before`` and matching the fields given (``issuers``: any of these issuers).
        ``fhir_user``: the user's URL at the source (the records' ``source_user``)."""
        q = select(func.count()).select_from(AuditEvent).where(
            AuditEvent.event == "exchange", AuditEvent.outcome == "granted", AuditEvent.time < before)
        for column, value in ((AuditEvent.jti, jti), (AuditEvent.client_id, client_id),
                              (AuditEvent.issuer, issuer), (AuditEvent.target, target),
                              (AuditEvent.source_patient, patient), (AuditEvent.source_user, fhir_user)):
            if value is not None:
                q = q.where(column == value)
        if issuers is not None:
            q = q.where(AuditEvent.issuer.in_(issuers))
        return self.session.execute(q).scalar()

    def record(self, event: dict) -> None:
        """An audit record (``audit.py`` built it), in this command's transaction."""
        self.session.add(AuditEvent(**event))

    def commit(self, actor: str, action: str, detail: str) -> None:
        """Record the change (who, what, when) with a generation bump, and commit;
        a constraint broken at the commit rolls everything back (``Conflict``)."""
        self.commit_all(actor, [(action, detail)])

    def commit_all(self, actor: str, events: list) -> None:
        """Several changes made together (`config apply`): an admin event for each
        (action, detail), one generation bump, one commit; a constraint broken at the
        commit rolls all of them back (``Conflict``)."""
        self.session.execute(update(Generation).where(Generation.id == 1).values(value=Generation.value + 1))
        for action, detail in events:
            self.session.add(AdminEvent(**audit.admin(actor, action, detail)))
        try:
            self.session.commit()
        except IntegrityError:
            self.session.rollback()
            raise Conflict(events[0][0] if events else "commit") from None

    def rollback(self) -> None:
        """Undo everything this change did (a dry run)."""
        self.session.rollback()


def _by_source_target(keys):
    """(source, patient, target_id) keys -> {(source, target_id): [patients]}: the
    queries below name source and target_id and list patients, which the unique
    index answers (a row-value IN list is a full scan on SQLite)."""
    groups: dict = {}
    for source, patient, target_id in keys:
        groups.setdefault((source, target_id), []).append(patient)
    return groups


class DuplicateLink(Exception):
    """A link in the batch is already stored (stored meanwhile): the import is refused."""


class LinkImport:
    """`link import`'s one transaction: batches of table links, matched links
    giving way, all or nothing. A batch is [(line number, {source, patient,
    target_id, target_patient})]."""

    def __init__(self, conn):
        self.conn = conn

    def has_links(self) -> bool:
        """Whether any link is stored at all (else no batch needs looking up)."""
        return self.conn.execute(select(PatientLink.id).limit(1)).first() is not None

    def stored(self, batch) -> dict:
        """The stored links among the batch's keys -> {(source, patient, target_id): origin}."""
        found = {}
        keys = ((r["source"], r["patient"], r["target_id"]) for _, r in batch)
        for (source, target_id), patients in _by_source_target(keys).items():
            for i in range(0, len(patients), 500):
                for row in self.conn.execute(select(PatientLink.patient, PatientLink.origin).where(
                        PatientLink.source == source, PatientLink.target_id == target_id,
                        PatientLink.patient.in_(patients[i:i + 500]))):
                    found[(source, row[0], target_id)] = row[1]
        return found

    def remove(self, keys) -> None:
        """Delete the links of these (source, patient, target_id) keys."""
        for (source, target_id), patients in _by_source_target(keys).items():
            for i in range(0, len(patients), 500):
                self.conn.execute(delete(PatientLink).where(
                    PatientLink.source == source, PatientLink.target_id == target_id,
                    PatientLink.patient.in_(patients[i:i + 500])))

    def insert(self, batch) -> None:
        """One batch inside the import's transaction: COPY on PostgreSQL (a million rows
        in seconds), executemany elsewhere. ``DuplicateLink`` when a link in it is
        already stored (the batch undone, the transaction still usable)."""
        rows = [r for _, r in batch]
        conn = self.conn
        try:
            with conn.begin_nested():
                if conn.dialect.name == "postgresql":
                    raw = conn.connection.driver_connection
                    with raw.cursor() as cur, cur.copy(
                            "COPY patient_link (source, patient, target_id, target_patient) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row((row["source"], row["patient"], row["target_id"],
                                            row["target_patient"]))
                else:
                    conn.execute(insert(PatientLink), rows)
        except Exception as e:  # IntegrityError, or the driver's own from COPY
            if isinstance(e, IntegrityError) or type(e).__name__ in ("UniqueViolation", "IntegrityError"):
                raise DuplicateLink() from None
            raise

    def finish(self, actor: str, action: str, detail: str) -> None:
        """The import's admin event and generation bump, in its transaction."""
        bump_conn(self.conn, actor, action, detail)


class Admin:
    """Where the CLI's reads and writes start."""

    def __init__(self, engine):
        self.engine = engine

    def change(self) -> AdminChange:
        return AdminChange(self.engine)

    @contextmanager
    def link_import(self):
        """A ``LinkImport`` in one transaction: committed when the block ends, rolled back on an error."""
        with self.engine.begin() as conn:
            yield LinkImport(conn)

    @contextmanager
    def links(self, source=None, target_id=None, origins=None, stream=False):
        """The links (source, patient, target base URL, target patient, origin, system,
        matched_at) in the order stored; ``stream``: read in chunks (an export)."""
        q = (select(PatientLink.source, PatientLink.patient, Target.base_url, PatientLink.target_patient,
                    PatientLink.origin, PatientLink.system, PatientLink.matched_at)
             .join(Target, PatientLink.target_id == Target.id).order_by(PatientLink.id))
        if source:
            q = q.where(PatientLink.source == source)
        if target_id is not None:
            q = q.where(PatientLink.target_id == target_id)
        if origins:
            q = q.where(PatientLink.origin.in_(origins))
        with self.engine.connect() as conn:
            if stream:
                conn = conn.execution_options(stream_results=True, yield_per=10000)
            yield conn.execute(q)
