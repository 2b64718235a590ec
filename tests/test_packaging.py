"""Installed as a deployer installs it (contract "Admin CLI"; issue "Operators and
admins"): a wheel in a fresh virtual environment migrates, serves and grants an
exchange from a directory that is not the source tree, with one default database
for the CLI and the server."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from conftest import VENDOR_SECRET
from fakes import SOURCE, TARGET, UPSTREAM, free_port

ROOT = Path(__file__).resolve().parent.parent


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-1500:]}{r.stderr[-1500:]}"
    return r


def test_a_wheel_in_a_fresh_venv_migrates_serves_and_grants_from_another_directory(tmp_path, ehr):
    wheels, venv, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)])
    (wheel,) = wheels.glob("token_exchange-*.whl")
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)])
    te = str(venv / "bin" / "token-exchange")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKEN_EXCHANGE_", "PYTHON"))}
    env.update(TOKEN_EXCHANGE_ISSUER=f"http://127.0.0.1:{port}", VENDOR_SECRET=VENDOR_SECRET)

    def cli(*args):
        return run([te, *args], cwd=work, env=env)
    assert "current schema" in cli("db", "upgrade").stdout
    cli("issuer", "add", ehr.issuer, "--jwks-uri", ehr.issuer + "/jwks", "--source", SOURCE)
    cli("target", "add", TARGET, "--name", "hospital-b")
    cli("client", "add", "vendor", "--secret-env", "VENDOR_SECRET")
    cli("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--scopes",
        "patient/*.rs", "--upstream-client-id", UPSTREAM)
    cli("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", TARGET, "--target-patient", "b-456")
    assert not list(work.iterdir()), "nothing is written into the working directory"
    db = venv / "var" / "token_exchange-instance" / "token_exchange.db"
    assert db.is_file(), "the default database lives under the environment's var/"

    server = subprocess.Popen([te, "serve", "--port", str(port), "--workers", "1"], cwd=work, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if requests.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening, or not answering yet
                pass
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.1)  # polling the server's start, not papering over a race
        r = requests.post(base + "/token", auth=("vendor", VENDOR_SECRET), timeout=10, data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": ehr.access_token(), "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "actor_token": ehr.id_token(), "actor_token_type": "urn:ietf:params:oauth:token-type:id_token",
            "resource": TARGET, "scope": "patient/Observation.rs"})
        assert r.status_code == 200, r.text
        assert r.json()["patient"] == "b-456"  # the server read the links the CLI wrote: one database
        # the consent pages' templates and stylesheet ship in the wheel
        assert requests.get(base + "/consent", timeout=10).status_code == 200
        assert requests.get(base + "/consent/static/consent.css", timeout=10).status_code == 200
    finally:
        server.terminate()
        server.wait(30)
