"""Fixtures: a database per test (SQLite always; PostgreSQL when
TOKEN_EXCHANGE_TEST_POSTGRES_URL is set), a fake EHR on loopback, the real CLI
(click) and the real WSGI app (Flask's test client speaks its HTTP surface)."""
from __future__ import annotations

import functools
import os
import uuid

import pytest
from click.testing import CliRunner

from fakes import SOURCE, TARGET, TARGET2, UPSTREAM, FakeEHR, FakeFHIR
from fhirserver import MedplumFHIRServer, require_all
from fhirserver import unavailable as fhir_server_unavailable
from oidc_provider import OIDCProvider

PG_URL = os.environ.get("TOKEN_EXCHANGE_TEST_POSTGRES_URL")
REDIS_URL = os.environ.get("TOKEN_EXCHANGE_TEST_REDIS_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])

VENDOR_SECRET = "vendor-A-secret-0123456789abcdef0123"
OTHER_SECRET = "vendor-B-secret-0123456789abcdef0123"
TARGET_SECRET = "target-B-secret-0123456789abcdef0123"
TARGET2_SECRET = "target-C-secret-0123456789abcdef0123"
EHR_INTROSPECTION_SECRET = "ehr-introspection-secret-0123456789"
SERVICE = "http://te.test"
TE = "urn:ietf:params:oauth:grant-type:token-exchange"
AT = "urn:ietf:params:oauth:token-type:access_token"
JWT_T = "urn:ietf:params:oauth:token-type:jwt"
IDT = "urn:ietf:params:oauth:token-type:id_token"
LOGIN_SECRET = "te-login-secret-0123456789abcdef0123"
LOGIN_CLIENT = "te-login"
BROWSER_SKIP = ("Browser tests NOT RUN: install Debian's chromium and chromium-driver "
                "(/usr/bin/chromium, /usr/bin/chromedriver) and `pip install selenium`")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (setup.cfg) starts two workers per core: the tests spend about half
    their time waiting on the servers they start (gunicorn, Medplum, Chromium, the fake
    EHR, PostgreSQL), so one worker per core leaves a core idle. xdist's own
    PYTEST_XDIST_AUTO_NUM_WORKERS still sets the number."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's default hook reads it
    return 2 * (os.cpu_count() or 1)


def pytest_report_header(config):
    lines = [f"database backends: {', '.join(BACKENDS)}"]
    if not PG_URL:
        lines.append("PostgreSQL tests NOT RUN: set TOKEN_EXCHANGE_TEST_POSTGRES_URL "
                     "(e.g. postgresql://postgres@127.0.0.1:5432/test) to run them")
    if not REDIS_URL:
        lines.append("Redis tests NOT RUN: set TOKEN_EXCHANGE_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    if fhir_server_unavailable():
        lines.append(fhir_server_unavailable())
    if dpop_client_unavailable():
        lines.append(dpop_client_unavailable())
    if browser_unavailable():
        lines.append(browser_unavailable())
    return lines


DPOP_CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpop_client")
DPOP_CLIENT_SKIP = ("oauth4webapi DPoP client tests NOT RUN: install node and run "
                    "`npm ci --prefix tests/dpop_client`")


@functools.cache
def dpop_client_unavailable() -> str | None:
    """None when the oauth4webapi DPoP client (tests/dpop_client) can run here, else the plain reason."""
    import shutil
    if not shutil.which("node") or not os.path.isdir(os.path.join(DPOP_CLIENT, "node_modules", "oauth4webapi")):
        return DPOP_CLIENT_SKIP
    return None


@functools.cache
def browser_unavailable() -> str | None:
    """None when headless Chromium can be driven here, else the plain reason."""
    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    return f"{BROWSER_SKIP} (missing: {', '.join(missing)})" if missing else None


def pytest_terminal_summary(terminalreporter):
    for line in pytest_report_header(None)[1:]:
        terminalreporter.write_line(line)


def _pg_admin():
    from sqlalchemy import create_engine

    from token_exchange.db import normalize_url
    return create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT")


def _pg_url(name):
    from sqlalchemy.engine import make_url
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def _create_pg(name, template=None):
    from sqlalchemy import text
    admin = _pg_admin()
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    admin.dispose()


def _drop_pg(name):
    from sqlalchemy import text
    admin = _pg_admin()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


class Templates:
    """Databases built once per run through the real CLI (migrated; migrated + the
    standard world) and restored per test, so each test starts from the same state
    without paying for migrations: a file copy on SQLite; on PostgreSQL one database
    for the whole run, reset per test (TRUNCATE and re-insert the template's rows),
    created and dropped by the run."""

    def __init__(self, tmp_factory, ehr):
        self.dir = tmp_factory.mktemp("templates")
        self.ehr = ehr
        self.built = {}
        self.snapshots = {}
        self.pg_name = None
        self.pg_engine = None

    def _build(self, url, kind):
        c = CLI(base_env(url))
        c("db", "upgrade")
        if kind == "world":
            build_world(c, self.ehr)

    def sqlite(self, kind, tmp_path):
        import shutil
        if kind not in self.built:
            self.built[kind] = self.dir / f"{kind}.db"
            self._build(f"sqlite:///{self.built[kind]}", kind)
        dst = tmp_path / "te.db"
        shutil.copyfile(self.built[kind], dst)
        return f"sqlite:///{dst}"

    def postgresql(self, kind):
        """Reset the run's PostgreSQL database to `kind` (None: empty) and return its URL."""
        from sqlalchemy import insert, select, text

        from token_exchange import db
        from token_exchange.models import Base
        if self.pg_name is None:
            self.pg_name = f"te_test_{uuid.uuid4().hex[:12]}"
            _create_pg(self.pg_name)
            self.pg_engine = db.make_engine(_pg_url(self.pg_name))
        url, engine = _pg_url(self.pg_name), self.pg_engine
        engine.dispose()
        if kind is not None and kind not in self.snapshots:
            self._wipe(engine)
            self._build(url, kind)
            with engine.connect() as conn:
                self.snapshots[kind] = {t.name: [dict(r._mapping) for r in conn.execute(select(t))]
                                        for t in Base.metadata.sorted_tables}
        if kind is None:
            self._wipe(engine)
            return url
        if not db.is_current(engine):
            self._wipe(engine)
            db.upgrade(engine)
        with engine.begin() as conn:
            for t in Base.metadata.sorted_tables:
                conn.execute(text(f'TRUNCATE "{t.name}" RESTART IDENTITY CASCADE'))
            for t in Base.metadata.sorted_tables:
                rows = self.snapshots[kind][t.name]
                if rows:
                    conn.execute(insert(t), rows)
                if "id" in t.c and rows:
                    conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{t.name}', 'id'), "
                                      f'(SELECT max(id) FROM "{t.name}"))'))
        engine.dispose()
        return url

    @staticmethod
    def _wipe(engine):
        from sqlalchemy import text
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))

    def drop(self):
        if self.pg_name:
            self.pg_engine.dispose()
            _drop_pg(self.pg_name)


@pytest.fixture(scope="session")
def templates(tmp_path_factory, ehr):
    t = Templates(tmp_path_factory, ehr)
    yield t
    t.drop()


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path, templates):
    """A database for this test alone: empty, or (for tests that use the `cli` or
    `world` fixtures) holding the migrated template's or the world template's state."""
    kind = "world" if "world" in request.fixturenames else "migrated" if "cli" in request.fixturenames else None
    if request.param == "postgresql":
        return templates.postgresql(kind)
    if kind is None:
        return f"sqlite:///{tmp_path}/te.db"
    return templates.sqlite(kind, tmp_path)


@pytest.fixture
def env(db_url):
    return dict(base_env(db_url), TOKEN_EXCHANGE_REDIS_PREFIX=f"te-test-{uuid.uuid4().hex}")


def base_env(db_url):
    return {
        "TOKEN_EXCHANGE_DATABASE_URL": db_url,
        "TOKEN_EXCHANGE_ISSUER": SERVICE,
        "TOKEN_EXCHANGE_RELOAD_INTERVAL": "0",
        "TOKEN_EXCHANGE_ADMIN": "test-admin",
        "VENDOR_SECRET": VENDOR_SECRET,
        "OTHER_SECRET": OTHER_SECRET,
        "TARGET_SECRET": TARGET_SECRET,
        "TARGET2_SECRET": TARGET2_SECRET,
        "EHR_SECRET": EHR_INTROSPECTION_SECRET,
        "LOGIN_SECRET": LOGIN_SECRET,
    }


class CLI:
    """The real `token-exchange` click commands, in process."""

    def __init__(self, env):
        self.env = env

    def __call__(self, *args, check=True, input=None):
        from token_exchange.cli import cli
        result = CliRunner().invoke(cli, list(args), env=self.env, input=input, catch_exceptions=False)
        if check and result.exit_code != 0:
            raise AssertionError(f"token-exchange {' '.join(args)} failed ({result.exit_code}): "
                                 f"{result.output}{result.stderr}")
        return result


@pytest.fixture
def cli(env):
    return CLI(env)  # on a database cloned from the migrated template


@pytest.fixture(scope="session")
def fhir_server_factory():
    """fhir_server_factory(jwks_url=..., issuer=..., [audience=...]): a running Medplum FHIR
    server (tests/fhirserver.py), emptied, shared by every test asking for the same settings.
    Skips when node cannot run it; fails instead under TOKEN_EXCHANGE_TEST_REQUIRE_ALL=1."""
    if fhir_server_unavailable():
        (pytest.fail if require_all() else pytest.skip)(fhir_server_unavailable())
    servers = {}

    def start(**settings):
        key = tuple(sorted(settings.items()))
        if key in servers:
            servers[key].reset()
        else:
            servers[key] = MedplumFHIRServer(**settings)
        return servers[key]
    yield start
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def ehr():
    e = FakeEHR("ehr-a")
    yield e
    e.stop()


@pytest.fixture(scope="session")
def ehr_b():
    e = FakeEHR("ehr-b", alg="ES256")
    yield e
    e.stop()


@pytest.fixture(autouse=True)
def _reset_ehrs(request):
    yield
    for name in ("ehr", "ehr_b"):
        if name in request.fixturenames:
            e = request.getfixturevalue(name)
            e.down, e.hang, e.opaque, e.extra_keys, e.introspection_auth = False, 0.0, {}, [], []
    if "op" in request.fixturenames:
        request.getfixturevalue("op").reset()


@pytest.fixture
def fhir():
    """A fake target FHIR server for patient matching (tests/fakes.py FakeFHIR)."""
    f = FakeFHIR()
    yield f
    f.stop()


@pytest.fixture(scope="session")
def op():
    """An OpenID Connect provider (Authlib's server side, tests/oidc_provider.py) that is
    also the EHR of the consent tests. Users: patient (sub user-1, the patient a-123),
    other (sub user-2, another patient), relative (sub user-3, a RelatedPerson)."""
    p = OIDCProvider()
    p.add_user("patient", "patient-pw", "user-1", f"{SOURCE}/Patient/a-123")
    p.add_user("other", "other-pw", "user-2", f"{SOURCE}/Patient/a-777")
    p.add_user("relative", "relative-pw", "user-3", f"{SOURCE}/RelatedPerson/r-1")
    yield p
    p.stop()


APP_REDIRECT = "http://127.0.0.1:9/app/consent-done"


def build_consent_world(cli, op, service=SERVICE, app_redirect=APP_REDIRECT, **trust):
    """The OP as a trusted issuer with the service's login client at it; target B;
    client 'vendor' (named "Acme Health", one redirect URI) whose trust requires
    consent; the patient link a-123 -> b-456."""
    op.add_client(LOGIN_CLIENT, [service + "/consent/callback"], secret=LOGIN_SECRET)
    cli("issuer", "add", op.issuer, "--jwks-uri", op.issuer + "/jwks", "--source", SOURCE, "--algs", "RS256",
        "--login-client-id", LOGIN_CLIENT, "--login-secret-env", "LOGIN_SECRET")
    cli("target", "add", TARGET, "--name", "hospital-b", "--introspection-secret-env", "TARGET_SECRET")
    cli("client", "add", "vendor", "--secret-env", "VENDOR_SECRET", "--name", "Acme Health",
        "--redirect-uri", app_redirect)
    cli("client", "add", "other", "--secret-env", "OTHER_SECRET", "--name", "Other App")
    args = ["--consent", "required"] + [x for k, v in trust.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    for client in ("vendor", "other"):
        cli("trust", "add", "--client", client, "--issuer", op.issuer, "--target", TARGET,
            "--scopes", "patient/*.rs patient/Appointment.cruds user/*.rs", "--upstream-client-id", UPSTREAM, *args)
    cli("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", TARGET, "--target-patient", "b-456")
    return cli


@pytest.fixture
def world(cli):
    """Issuer A (the EHR), targets B and C, clients 'vendor' (trusted A -> B) and
    'other' (no trust), one patient link a-123 -> b-456 at B: cloned from a template
    that build_world made through the CLI."""
    return cli


def build_world(cli, ehr):
    cli("issuer", "add", ehr.issuer, "--jwks-uri", ehr.issuer + "/jwks", "--source", SOURCE,
        "--introspection-endpoint", ehr.issuer + "/introspect", "--introspection-client-id", "te",
        "--introspection-secret-env", "EHR_SECRET")
    cli("target", "add", TARGET, "--name", "hospital-b", "--introspection-secret-env", "TARGET_SECRET")
    cli("target", "add", TARGET2, "--name", "clinic-c", "--introspection-secret-env", "TARGET2_SECRET")
    cli("client", "add", "vendor", "--secret-env", "VENDOR_SECRET")
    cli("client", "add", "other", "--secret-env", "OTHER_SECRET")
    cli("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET,
        "--scopes", "patient/*.rs user/*.rs", "--upstream-client-id", UPSTREAM)
    cli("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", TARGET, "--target-patient", "b-456")
    return cli


@pytest.fixture
def app(env, world):
    from token_exchange import create_app
    application = create_app(env=env)
    yield application
    application.extensions["token_exchange"].store.close()
    application.extensions["token_exchange"].engine.dispose()


@pytest.fixture
def http(app):
    return app.test_client()


@pytest.fixture
def exchange(http, exchange_factory):
    """POST /token with the standard, valid access-token exchange; override any field
    (None removes it)."""
    return lambda **over: exchange_factory(http, **over)


@pytest.fixture
def exchange_factory(ehr):
    """exchange() against any test client."""
    def do(http, auth=("vendor", VENDOR_SECRET), headers=None, **over):
        data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
                "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET,
                "scope": "patient/Observation.rs"}
        data.update(over)
        data = {k: v for k, v in data.items() if v is not None}
        return post_token(http, data, auth=auth, headers=headers)
    return do


def post_token(http, data, auth=("vendor", VENDOR_SECRET), headers=None):
    import base64
    h = dict(headers or {})
    if auth is not None:
        h["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    if isinstance(data, list):
        from werkzeug.datastructures import MultiDict
        data = MultiDict(data)
    return http.post("/token", data=data, headers=h)


def audit_rows(cli, *args):
    import json
    return json.loads(cli("audit", "list", "--json", *args).output)
