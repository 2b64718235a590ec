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
