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


def readme_example(name="example") -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {name}:start -->\s*```sh\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert m, f"README.md lost its {name} markers"
    return m.group(1)


def run_readme(tmp_path, ehr, db_url, *blocks, **extra_env):
    env = dict(os.environ)
    env.update(PATH=str(Path(sys.executable).parent) + os.pathsep + env["PATH"], PORT=str(free_port()),
               TOKEN_EXCHANGE_DATABASE_URL=db_url, EHR_ISSUER=ehr.issuer,
               ACCESS_TOKEN=ehr.access_token(), ID_TOKEN=ehr.id_token())
    env.update(extra_env)
    script = "\n".join(readme_example(b) for b in blocks)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_readme_worked_example_exchanges_a_token(tmp_path, ehr, db_url):
    r = run_readme(tmp_path, ehr, db_url, "example")
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


def test_readme_explain_and_issuer_check_examples_run_on_the_worked_example(tmp_path, ehr, db_url):
    r = run_readme(tmp_path, ehr, db_url, "example", "explain-example")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "the service can use this issuer" in r.stdout
    assert "decision: granted: patient/Observation.rs for https://fhir.b.example/fhir, patient b-456" in r.stdout


def test_readme_jwt_grant_example_mints_a_token(tmp_path, ehr, db_url):
    import time
    import uuid
    port = free_port()
    now = int(time.time())
    grant = ehr.sign({"iss": ehr.issuer, "sub": "user-1", "aud": f"http://127.0.0.1:{port}", "client_id": "vendor",
                      "azp": "vendor-at-ehr", "iat": now, "exp": now + 240, "jti": uuid.uuid4().hex,
                      "scope": "patient/*.rs", "patient": "a-123", "source": "https://fhir.a.example/fhir"},
                     headers={"typ": "oauth-id-jag+jwt"})
    r = run_readme(tmp_path, ehr, db_url, "example", "jwt-example", GRANT=grant, PORT=str(port))
    assert r.returncode == 0, r.stderr[-2000:]
    body = json.loads(r.stdout.strip().splitlines()[-1])
    assert body["patient"] == "b-456" and body["scope"] == "patient/Observation.rs", body
    assert "issued_token_type" not in body
