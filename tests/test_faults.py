"""Faults: database unreachable (503 and recovery), issuer JWKS down (cached keys
keep serving), issuer hanging (bounded timeouts)."""
from __future__ import annotations

import jwt
import pytest
from sqlalchemy.engine import make_url

from conftest import PG_URL, audit_rows
from fakes import TCPProxy
from test_token import error_of

needs_pg = pytest.mark.skipif(not PG_URL, reason="needs PostgreSQL: set TOKEN_EXCHANGE_TEST_POSTGRES_URL")


@pytest.fixture
def proxied(env, world, db_url):
    """The app on a database reached through a proxy the test can cut."""
    from token_exchange import create_app
    url = make_url(db_url)
    if not url.drivername.startswith("postgresql"):
        pytest.skip("cutting the database connection applies to the PostgreSQL backend only")
    proxy = TCPProxy(url.port or 5432, url.host or "127.0.0.1")
    env = dict(env, TOKEN_EXCHANGE_DATABASE_URL=url.set(host="127.0.0.1", port=proxy.port)
               .render_as_string(hide_password=False))
    yield proxy, env, create_app
    proxy.down()


@needs_pg
def test_unreachable_database_is_503_and_recovers_by_itself(proxied, exchange):
    proxy, env, create_app = proxied
    app = create_app(env=env)
    http = app.test_client()
    from conftest import post_token
    assert http.get("/readyz").status_code == 200
    proxy.down()
    r = http.get("/readyz")
    assert r.status_code == 503 and r.headers["Retry-After"]
    body = error_of(post_token(http, {"grant_type": "x"}), 503, "temporarily_unavailable")
    assert "Traceback" not in body["error_description"]
    proxy.up()
    assert http.get("/readyz").status_code == 200
    assert post_token(http, {"grant_type": "x"}).status_code == 400  # past the database again
    app.extensions["token_exchange"].engine.dispose()


@needs_pg
def test_service_started_while_database_is_down_serves_503_then_recovers(proxied):
    proxy, env, create_app = proxied
    proxy.down()
    app = create_app(env=env)  # must not need the database to start
    http = app.test_client()
    from conftest import post_token
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 503
    error_of(post_token(http, {"grant_type": "x"}), 503, "temporarily_unavailable")
    proxy.up()
    assert http.get("/readyz").status_code == 200
    app.extensions["token_exchange"].engine.dispose()


@needs_pg
def test_an_exchange_after_the_server_closed_the_kept_connection_is_answered_and_audited(db_url, exchange, world):
    """The hot path keeps one PostgreSQL connection per thread and sends the audit insert on it
    without waiting (libpq's asynchronous calls). A connection the server closed while it sat
    idle (a restart, a failover, an idle timeout) is found closed before anything is sent on
    it: the exchange opens a fresh one and is answered and audited as usual."""
    import sqlalchemy
    if not db_url.startswith("postgresql"):
        pytest.skip("closing the server side of a kept connection applies to PostgreSQL")
    assert exchange().status_code == 200  # the kept connection is opened
    assert exchange().status_code == 200  # and used again (the insert sent without waiting)
    engine = sqlalchemy.create_engine(db_url)
    with engine.connect() as conn:
        closed = conn.execute(sqlalchemy.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
    engine.dispose()
    assert closed >= 1
    before = len(audit_rows(world))
    r = exchange()
    assert r.status_code == 200, r.get_data(as_text=True)
    rows = audit_rows(world)
    assert len(rows) == before + 1 and rows[-1]["jti"] == jwt.decode(
        r.get_json()["access_token"], options={"verify_signature": False})["jti"]


def test_cached_jwks_keeps_serving_while_the_issuer_is_down(exchange, ehr):
    assert exchange().status_code == 200  # warms the cache
    ehr.down = True
    assert exchange().status_code == 200


def test_unknown_kid_while_issuer_is_down_is_invalid_request(exchange, ehr):
    from fakes import new_key
    assert exchange().status_code == 200
    ehr.down = True
    tok = ehr.sign(ehr.access_claims(), key=new_key(), headers={"kid": "rotated-away"})
    body = error_of(exchange(subject_token=tok), 400, "invalid_request")
    assert "key" in body["error_description"]


def test_forged_kids_refetch_the_jwks_at_most_once_per_interval(exchange, ehr):
    from fakes import new_key
    assert exchange().status_code == 200
    hits = ehr.jwks_hits
    for i in range(5):
        tok = ehr.sign(ehr.access_claims(), key=new_key(), headers={"kid": f"forged-{i}"})
        error_of(exchange(subject_token=tok), 400, "invalid_request")
    assert ehr.jwks_hits - hits <= 1


def test_issuer_first_seen_while_down_is_invalid_request(exchange, ehr, app):
    ehr.down = True
    error_of(exchange(), 400, "invalid_request")


def test_hanging_issuer_is_bounded_by_the_timeout(world, env, ehr):
    """The EHR answers correctly, but only after 3 s: with a 1 s timeout the worker
    gives up (invalid_request) instead of waiting; without one this would be a 200."""
    from conftest import post_token
    from token_exchange import create_app
    env = dict(env, TOKEN_EXCHANGE_HTTP_TIMEOUT="1")
    http = create_app(env=env).test_client()
    ehr.hang = 3
    data = {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": ehr.access_token(),
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "resource": "https://fhir.b.example/fhir"}
    body = error_of(post_token(http, data), 400, "invalid_request")
    assert "could not be fetched" in body["error_description"]


@pytest.fixture
def writer_lock(env):
    """The sidecar file the service's SQLite audit writers queue on, opened as another
    worker would open it."""
    import fcntl
    url = make_url(env["TOKEN_EXCHANGE_DATABASE_URL"])
    if not url.drivername.startswith("sqlite"):
        pytest.skip("the writer lock orders SQLite writers; PostgreSQL has row-level locking")
    with open(f"{url.database}-writer.lock", "ab") as f:
        yield f, fcntl


def test_sqlite_audit_writers_take_turns_on_the_writer_lock(writer_lock, exchange):
    import threading
    f, fcntl = writer_lock
    assert exchange().status_code == 200  # the service has made its lock file
    fcntl.flock(f, fcntl.LOCK_EX)  # another worker is writing its audit record
    done, results = threading.Event(), []
    worker = threading.Thread(target=lambda: (results.append(exchange().status_code), done.set()))
    worker.start()
    try:
        assert not done.wait(0.5), "the exchange committed its audit record while another writer held the lock"
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
    worker.join(30)
    assert results == [200]


def test_a_failed_audit_write_releases_the_writer_lock(writer_lock, exchange, env):
    import sqlite3
    f, fcntl = writer_lock
    db = sqlite3.connect(make_url(env["TOKEN_EXCHANGE_DATABASE_URL"]).database)
    db.execute("ALTER TABLE audit_event RENAME TO audit_event_away")
    db.commit()
    error_of(exchange(), 503, "temporarily_unavailable")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if the service still held it
    fcntl.flock(f, fcntl.LOCK_UN)
    db.execute("ALTER TABLE audit_event_away RENAME TO audit_event")
    db.commit()
    db.close()
    assert exchange().status_code == 200


def test_sqlite_audit_writers_checkpoint_the_wal_every_so_many_commits(exchange, env, monkeypatch):
    """The hot path's commits never checkpoint inside the writer lock (a checkpoint ends
    with an fsync); its connection checkpoints every CHECKPOINT_EVERY commits instead,
    after letting the lock go: the audit records reach the database file."""
    import os
    from token_exchange.store import hotpath
    url = make_url(env["TOKEN_EXCHANGE_DATABASE_URL"])
    if not url.drivername.startswith("sqlite"):
        pytest.skip("WAL checkpoints of the database file are SQLite's; PostgreSQL's checkpointer does its own")
    monkeypatch.setattr(hotpath, "CHECKPOINT_EVERY", 5)
    path = url.database
    assert exchange().status_code == 200
    before = os.path.getsize(path)
    for _ in range(40):
        assert exchange().status_code == 200
    assert os.path.getsize(path) > before, "the audit records stayed in the WAL: no checkpoint ran"


def test_a_filesystem_that_refuses_flock_leaves_the_ordering_to_sqlite(writer_lock, exchange, monkeypatch, caplog):
    import errno
    from token_exchange.store import hotpath as store
    calls = []

    def refuse(f, op):
        calls.append(op)
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(store.fcntl, "flock", refuse)
    assert exchange().status_code == 200
    assert exchange().status_code == 200
    assert calls == [store.fcntl.LOCK_EX], "the lock was tried again after the filesystem refused it"
    assert any("busy handler alone" in r.getMessage() for r in caplog.records)


def test_group_commit_answers_each_audit_record_alone_when_a_shared_commit_fails(db_url, world, monkeypatch):
    """Threaded workers commit concurrent audit records together (SQLite and PostgreSQL); a
    record that cannot be written fails only its own request, and every other one is committed."""
    import threading

    from conftest import base_env
    from token_exchange import create_app
    app = create_app(env=base_env(db_url), group_commit=True)
    store = app.extensions["token_exchange"].store
    assert store._hot.group is not None
    gate = threading.Barrier(6)
    outcomes = {}

    def write(i):
        # Record 3 breaks a constraint (an audit record must have an outcome).
        event = {"client_id": f"c{i}", "outcome": None if i == 3 else "granted", "jti": f"j{i}"}
        gate.wait()
        try:
            store.record_audit(event)
            outcomes[i] = "ok"
        except Exception as e:  # noqa: BLE001 - record 3's NOT NULL outcome
            outcomes[i] = type(e).__name__
    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    app.extensions["token_exchange"].engine.dispose()
    assert sorted(v for v in outcomes.values() if v != "ok") == ["IntegrityError"]
    rows = {r["jti"] for r in audit_rows(world)}
    assert rows == {f"j{i}" for i, v in outcomes.items() if v == "ok"} and len(rows) == 5
