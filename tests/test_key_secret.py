"""One key secret per database: the CLI refuses, in one line, to seal or pepper
anything under a TOKEN_EXCHANGE_KEY_SECRET that cannot unseal what is already
stored, and `keys reseal` moves every stored key and secret to a new key secret
(all or nothing). Through the real CLI and HTTP."""
from __future__ import annotations

from sqlalchemy import MetaData, create_engine, select

from contextlib import contextmanager

from conftest import CLI, EHR_INTROSPECTION_SECRET
from fakes import TARGET

FIRST = "first-key-secret-0123456789abcdef"
ANOTHER = "another-key-secret-0123456789abcdef"


def under(env, secret, **more):
    return CLI(dict(env, TOKEN_EXCHANGE_KEY_SECRET=secret, **more))


def one_error(result) -> str:
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def sealed_world(env):
    """The world's keys and the EHR's introspection secret, sealed under FIRST."""
    first = under(env, FIRST)
    first("keys", "reseal")  # the world stored them before any key secret was set
    return first


@contextmanager
def service(env, secret):
    """The service as `create_app` (any WSGI server) starts it under ``secret``."""
    from token_exchange import create_app
    app = create_app(env=dict(env, TOKEN_EXCHANGE_KEY_SECRET=secret))
    try:
        yield app.test_client()
    finally:
        app.extensions["token_exchange"].store.close()
        app.extensions["token_exchange"].engine.dispose()


def dump(env) -> str:
    from token_exchange.db import normalize_url
    engine = create_engine(normalize_url(env["TOKEN_EXCHANGE_DATABASE_URL"]))
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return "\n".join(repr(row) for t in meta.sorted_tables for row in conn.execute(select(t)))
    finally:
        engine.dispose()


def test_the_cli_refuses_to_store_keys_or_secrets_under_a_key_secret_that_cannot_unseal_the_stored_ones(
        env, world, ehr):
    sealed_world(env)
    before = dump(env)
    another = under(env, ANOTHER)
    for args in (("keys", "rotate"), ("keys", "stage"),
                 ("client", "rotate-secret", "vendor", "--secret-env", "VENDOR_SECRET"),
                 ("client", "add", "v3", "--secret-env", "OTHER_SECRET"),
                 ("target", "update", TARGET, "--introspection-secret-env", "TARGET_SECRET"),
                 ("issuer", "update", ehr.issuer, "--introspection-secret-env", "EHR_SECRET")):
        line = one_error(another(*args, check=False))
        assert line.startswith("error: TOKEN_EXCHANGE_KEY_SECRET cannot unseal 2 stored key(s) or secret(s)"), line
        assert "keys reseal --old-secret-env" in line and ANOTHER not in line and FIRST not in line
    assert dump(env) == before  # nothing changed
    another("target", "update", TARGET, "--max-ttl", "120")  # a change that stores no secret is fine


def test_keys_reseal_moves_every_stored_key_and_secret_to_the_new_key_secret(env, world, exchange_factory):
    sealed_world(env)
    r = under(env, ANOTHER, OLD_KEY_SECRET=FIRST)("keys", "reseal", "--old-secret-env", "OLD_KEY_SECRET")
    assert r.stdout.strip() == "re-sealed 2 key(s) and secret(s) under the current TOKEN_EXCHANGE_KEY_SECRET"
    assert r.stderr.startswith("warning: client and target secrets are hashed with the key secret as pepper")
    assert FIRST not in r.output and ANOTHER not in r.output
    another = under(env, ANOTHER)
    another("client", "rotate-secret", "vendor", "--secret-env", "VENDOR_SECRET")  # allowed now
    # The service under the new key secret unseals its key and the EHR's introspection secret ...
    with service(env, ANOTHER) as new:
        assert new.get("/readyz").status_code == 200
        assert exchange_factory(new).status_code == 200
    with service(env, FIRST) as old:  # ... and nothing opens under the old one any more
        assert old.get("/readyz").status_code == 503
    assert "PRIVATE KEY" not in dump(env) and EHR_INTROSPECTION_SECRET not in dump(env)
    events = [e for e in another("audit", "list", "--admin", "--json").stdout.splitlines() if "keys.reseal" in e]
    assert events


def test_keys_reseal_with_a_wrong_old_key_secret_changes_nothing(env, world):
    sealed_world(env)
    before = dump(env)
    r = under(env, ANOTHER, OLD_KEY_SECRET="y" * 40)("keys", "reseal", "--old-secret-env", "OLD_KEY_SECRET",
                                                       check=False)
    line = one_error(r)
    assert "open under neither key secret" in line and "nothing was changed" in line and "y" * 40 not in line
    assert dump(env) == before


def test_keys_reseal_seals_what_was_stored_before_any_key_secret_was_set(env, world):
    assert "PRIVATE KEY" in dump(env)  # the world was built without a key secret
    r = under(env, FIRST)("keys", "reseal")
    assert r.stdout.startswith("re-sealed 2 key(s) and secret(s)") and r.stderr == ""
    assert "PRIVATE KEY" not in dump(env) and EHR_INTROSPECTION_SECRET not in dump(env)
    assert under(env, FIRST)("keys", "reseal").stdout.startswith("re-sealed 0 key(s)")  # idempotent


def test_keys_reseal_needs_a_key_secret_to_seal_under(env, world):
    line = one_error(CLI(env)("keys", "reseal", check=False))
    assert "TOKEN_EXCHANGE_KEY_SECRET is not set" in line
