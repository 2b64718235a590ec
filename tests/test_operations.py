"""Operators' additions (issue "Operators II"), through the real CLI: the version, the
database commands' messages, failures in one line that never repeat a secret, and a
mistyped SQLite URL that creates nothing."""
from __future__ import annotations

import os
import stat
import subprocess

from conftest import base_env
from test_scaleout import BIN


def run(*args, env=None, cwd=None):
    """The installed console script, as an operator runs it."""
    return subprocess.run([str(BIN / "token-exchange"), *args], env={**os.environ, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def one_error_line(r):
    lines = r.stderr.splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_a_sqlite_url_whose_folder_does_not_exist_is_one_error_line_naming_it_and_creates_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = run("db", "upgrade", env=base_env("sqlite:///tmp/x/nodir/x.db"), cwd=work)  # relative by mistake
    line = one_error_line(r)
    assert str(work / "tmp" / "x" / "nodir") in line and "absolute path" in line
    assert list(work.iterdir()) == []


def test_the_default_instance_folder_is_created_private(tmp_path):
    from token_exchange.db import make_engine
    folder = tmp_path / "instance"
    make_engine(f"sqlite:///{folder}/token_exchange.db", create_folders=True).dispose()
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(folder / "token_exchange.db").st_mode) == 0o600


def test_a_secret_given_to_secret_env_by_mistake_is_never_repeated(cli):
    import secrets
    for _ in range(20):  # token_urlsafe secrets without '-' look like variable names
        secret = secrets.token_urlsafe(32).replace("-", "x")
        r = cli("client", "add", "v2", "--secret-env", secret, check=False)
        assert r.exit_code == 1 and secret not in r.output + r.stderr
        assert "--secret-env" in r.stderr


def test_a_secret_env_variable_that_is_unset_names_the_option_not_the_variable(cli):
    r = cli("target", "add", "https://t.example/fhir", "--introspection-secret-env", "NOPE_NOT_SET", check=False)
    assert r.exit_code == 1 and "NOPE_NOT_SET" not in r.stderr and "--introspection-secret-env" in r.stderr


def test_version_prints_the_installed_version():
    from importlib.metadata import version
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"token-exchange {version('token-exchange')}"


def test_db_upgrade_current_history_and_downgrade_say_from_which_revision_to_which(tmp_path):
    from token_exchange.db import MIGRATIONS
    heads = sorted(p.name[:4] for p in (MIGRATIONS / "versions").glob("0*.py"))
    head = heads[-1]
    env = base_env(f"sqlite:///{tmp_path}/te.db")
    assert run("db", "current", env=env).stdout.startswith("an empty database")
    assert run("db", "upgrade", env=env).stdout.strip() == f"database upgraded from an empty database to {head} " \
                                                          "(the current schema)"
    assert run("db", "upgrade", env=env).stdout.strip() == f"database is at the current schema ({head}); nothing to do"
    assert run("db", "current", env=env).stdout.strip() == f"{head} (the current schema)"
    history = run("db", "history", env=env).stdout.splitlines()
    assert [line.split()[0] for line in history] == heads and history[-1].endswith("(this database)")
    assert run("db", "downgrade", heads[1], env=env).stdout.strip() == \
        f"database downgraded from {head} to {heads[1]}"
    assert run("db", "current", env=env).stdout.strip().startswith(f"{heads[1]} (the current schema is {head}")
    assert run("db", "upgrade", env=env).stdout.strip() == f"database upgraded from {heads[1]} to {head} " \
                                                          "(the current schema)"


def test_db_downgrade_to_an_unknown_revision_is_one_error_line_naming_the_known_ones(tmp_path):
    env = base_env(f"sqlite:///{tmp_path}/te.db")
    run("db", "upgrade", env=env)
    line = one_error_line(run("db", "downgrade", "9999", env=env))
    assert "'9999'" in line and "base, 0001" in line
    assert run("db", "current", env=env).stdout.strip().endswith("(the current schema)")  # nothing changed


def _non_json(r):
    return [line for line in r.stderr.splitlines() if not line.startswith("{")]


def test_serve_on_a_busy_port_is_one_error_line(env, world):
    import socket
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = run("serve", "--port", str(port), "--workers", "1", env=env)
    assert r.returncode == 1 and _non_json(r) == [f"error: cannot listen on 127.0.0.1:{port}: address already in use"]


def test_serve_refuses_a_key_secret_that_cannot_unseal_the_stored_keys_in_one_line(env, world):
    sealed = dict(env, TOKEN_EXCHANGE_KEY_SECRET="first-key-secret-0123456789abcdef")
    from conftest import CLI
    CLI(sealed)("keys", "rotate")  # the active key is sealed under the first secret
    from fakes import free_port
    r = run("serve", "--port", str(free_port()), "--workers", "1",
            env=dict(env, TOKEN_EXCHANGE_KEY_SECRET="another-key-secret-0123456789abcdef"))
    (line,) = _non_json(r)
    assert r.returncode == 1 and line.startswith("error: TOKEN_EXCHANGE_KEY_SECRET cannot unseal 1 stored key")
    assert "first-key-secret" not in r.stderr + r.stdout


def test_readyz_is_503_while_stored_keys_cannot_be_unsealed(env, world):
    from conftest import CLI
    from token_exchange import create_app
    CLI(dict(env, TOKEN_EXCHANGE_KEY_SECRET="first-key-secret-0123456789abcdef"))("keys", "rotate")
    app = create_app(env=dict(env, TOKEN_EXCHANGE_KEY_SECRET="another-key-secret-0123456789abcdef"))
    try:
        r = app.test_client().get("/readyz")
        assert r.status_code == 503 and "unsealed" in r.get_json()["reason"] and r.headers["Retry-After"]
        ok = create_app(env=dict(env, TOKEN_EXCHANGE_KEY_SECRET="first-key-secret-0123456789abcdef"))
        assert ok.test_client().get("/readyz").status_code == 200
    finally:
        app.extensions["token_exchange"].store.close()


def test_a_key_secret_shorter_than_32_characters_refuses_to_start_in_one_line(env, world):
    from fakes import free_port
    r = run("serve", "--port", str(free_port()), env=dict(env, TOKEN_EXCHANGE_KEY_SECRET="abc"))
    (line,) = _non_json(r)
    assert r.returncode == 1 and "TOKEN_EXCHANGE_KEY_SECRET must be at least 32 characters" in line
    assert "abc" not in line


def test_trust_show_prints_one_trust_with_every_option_as_text_or_json(world, ehr):
    import json as _json

    from fakes import TARGET
    key = ["--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET]
    shown = _json.loads(world("trust", "show", *key, "--json").output)
    listed = [t for t in _json.loads(world("trust", "list", "--json").output)
              if t["client"] == "vendor" and t["issuer"] == ehr.issuer and t["target"] == TARGET]
    assert listed == [shown] and shown["consent"] == "none"
    assert f"issuer: {ehr.issuer}" in world("trust", "show", *key).output
    r = world("trust", "show", "--client", "other", "--issuer", ehr.issuer, "--target", TARGET, check=False)
    assert r.exit_code == 1 and r.stderr.strip() == "error: no such trust"
