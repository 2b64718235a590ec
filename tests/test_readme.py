"""The README's worked example runs as written: the real CLI, the real server
(`token-exchange serve`, gunicorn), curl, against a fake EHR."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fakes import free_port

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- example:start -->\s*```sh\n(.*?)```\s*<!-- example:end -->", text, re.S)
    assert m, "README.md lost its worked example markers"
    return m.group(1)


def test_readme_worked_example_exchanges_a_token(tmp_path, ehr, db_url):
    from test_token import claims_of  # noqa: F401 (same verification as a target)
    env = dict(os.environ)
    env.update(PATH=str(Path(sys.executable).parent) + os.pathsep + env["PATH"], PORT=str(free_port()),
               TOKEN_EXCHANGE_DATABASE_URL=db_url, EHR_ISSUER=ehr.issuer,
               ACCESS_TOKEN=ehr.access_token(), ID_TOKEN=ehr.id_token())
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_example()], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    body = json.loads(r.stdout.strip().splitlines()[-1])
    assert body["patient"] == "b-456" and body["scope"] == "patient/Observation.rs", body
    assert body["token_type"] == "Bearer" and body["access_token"].count(".") == 2
    secret_lines = [line for line in r.stdout.splitlines() + r.stderr.splitlines() if "VENDOR_SECRET" in line]
    assert secret_lines == []


@pytest.mark.parametrize("cmd", [["token-exchange", "--help"], [sys.executable, "-m", "token_exchange", "--help"]])
def test_cli_is_reachable_as_console_script_and_module(cmd):
    if cmd[0] == "token-exchange":
        cmd[0] = str(Path(sys.executable).parent / "token-exchange")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "issuer" in r.stdout and "trust" in r.stdout
