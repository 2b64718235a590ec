"""The README's worked example runs as written: the real CLI, the real server
(`token-exchange serve`, gunicorn), curl, against the stand-in EHR examples/ehr.py."""
from __future__ import annotations

import json
import os
import re
import shutil
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


def worked_example_blocks() -> list[str]:
    """Every ```sh block of the README's "Worked example" section, in order."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Worked example\n(.*?)^## ", text, re.S | re.M)
    assert m, "README.md lost its Worked example section"
    return re.findall(r"```sh\n(.*?)```", m.group(1), re.S)


def run_readme(tmp_path, *blocks, script=None, **extra_env):
    """Run README blocks as written with bash, from a copy of examples/ in a temp dir (the
    README's own SQLite database lands there), against `token-exchange serve` and
    examples/ehr.py, each on a free port."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_EXCHANGE_")}
    env.update(PATH=str(Path(sys.executable).parent) + os.pathsep + env["PATH"], PORT=str(free_port()),
               EHR_PORT=str(free_port()))
    env.update(extra_env)
    script = script if script is not None else "\n".join(readme_example(b) for b in blocks)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def json_lines(stdout: str) -> list[dict]:
    """The JSON objects starting a line (curl prints no newline after the answer)."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(line)[0] for line in stdout.splitlines() if line.startswith("{")]


def test_readme_worked_example_runs_as_written_with_the_stand_in_ehr(tmp_path):
    """Every shell block of the section, in order: the exchange, issuer check and explain, the JWT
    grant, the user at the target."""
    blocks = worked_example_blocks()
    assert len(blocks) == 4
    r = run_readme(tmp_path, script="\n".join(blocks))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    exchanged, granted, user = json_lines(r.stdout)
    assert user["scope"] == "user/Observation.rs", user
    assert _claims(user)["fhirUser"] == "https://fhir.b.example/fhir/Practitioner/789"
    for body in (exchanged, granted):
        assert body["patient"] == "b-456" and body["scope"] == "patient/Observation.rs", body
        assert body["token_type"] == "Bearer" and body["access_token"].count(".") == 2
    assert exchanged["issued_token_type"] and "issued_token_type" not in granted
    assert "the service can use this issuer" in r.stdout
    assert "decision: granted: patient/Observation.rs for https://fhir.b.example/fhir, patient b-456" in r.stdout
    assert (tmp_path / "example.db").exists()
    assert [line for line in r.stdout.splitlines() + r.stderr.splitlines() if "VENDOR_SECRET" in line] == []


def test_readme_worked_example_exchanges_a_token(tmp_path, db_url):
    r = run_readme(tmp_path, "example", TOKEN_EXCHANGE_DATABASE_URL=db_url)
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


def test_readme_explain_and_issuer_check_examples_run_on_the_worked_example(tmp_path, db_url):
    r = run_readme(tmp_path, "example", "explain-example", TOKEN_EXCHANGE_DATABASE_URL=db_url)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "the service can use this issuer" in r.stdout
    assert "decision: granted: patient/Observation.rs for https://fhir.b.example/fhir, patient b-456" in r.stdout


def _claims(body):
    import jwt
    return jwt.decode(body["access_token"], options={"verify_signature": False})


def test_readme_user_example_maps_the_user_onto_the_target(tmp_path, db_url):
    r = run_readme(tmp_path, "example", "user-example", TOKEN_EXCHANGE_DATABASE_URL=db_url)
    assert r.returncode == 0, r.stderr[-2000:]
    body = json.loads(r.stdout.strip().splitlines()[-1])
    assert body["scope"] == "user/Observation.rs" and "patient" not in body, body
    claims = _claims(body)
    assert claims["fhirUser"] == "https://fhir.b.example/fhir/Practitioner/789"
    assert "fhir.a.example" not in json.dumps(claims)


def test_readme_jwt_grant_example_mints_a_token(tmp_path, db_url):
    r = run_readme(tmp_path, "example", "jwt-example", TOKEN_EXCHANGE_DATABASE_URL=db_url)
    assert r.returncode == 0, r.stderr[-2000:]
    body = json.loads(r.stdout.strip().splitlines()[-1])
    assert body["patient"] == "b-456" and body["scope"] == "patient/Observation.rs", body
    assert "issued_token_type" not in body
