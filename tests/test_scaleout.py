"""Two real instances (`token-exchange serve`, gunicorn with two workers each,
separate processes) on one database: shared state holds across them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jwt
import pytest
import requests

from conftest import AT, IDT, REDIS_URL, TARGET_SECRET, TE, VENDOR_SECRET
from fakes import TARGET, free_port

BIN = Path(sys.executable).parent


class Instance:
    def __init__(self, env, tmp):
        # free_port() only picks a port that was free: another process (a parallel test, or a
        # client connection's ephemeral port) may take it before serve binds; then try another.
        for _ in range(3):
            if self._start(env, tmp):
                return
        raise AssertionError("instance could not find a free port")

    def _start(self, env, tmp) -> bool:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(BIN / "token-exchange"), "serve", "--port", str(self.port), "--workers", "2"],
                                     env=dict(os.environ, **env), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(self.base + "/readyz", timeout=1).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                self.log.close()
                if "address already in use" in self.log_path.read_text():
                    return False
                raise AssertionError("instance exited at start")
            time.sleep(0.1)
        raise AssertionError("instance did not become ready")

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(20)
        self.log.close()

    def exchange(self, ehr, **auth):
        data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
                "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET}
        data.update(auth.pop("data", {}))
        return requests.post(self.base + "/token", data=data, auth=auth.get("auth", ("vendor", VENDOR_SECRET)),
                             timeout=10)


def until(deadline_s, fn):
    """Poll fn until true or the deadline: the guarantee under test is 'within seconds'."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if fn():
            return True
        time.sleep(0.1)
    return fn()


def _instances(request, env, world, tmp_path):
    env = {k: v for k, v in env.items() if k != "TOKEN_EXCHANGE_RELOAD_INTERVAL"}  # production default
    if request.param == "database+redis":
        env["TOKEN_EXCHANGE_REDIS_URL"] = REDIS_URL
        world.env = dict(world.env, TOKEN_EXCHANGE_REDIS_URL=REDIS_URL)
    return Instance(env, tmp_path), Instance(env, tmp_path)


BACKENDS = ["database"] + (["database+redis"] if REDIS_URL else [])


@pytest.fixture(params=BACKENDS)
def pair(request, env, world, tmp_path):
    """Two instances; with Redis as well when TOKEN_EXCHANGE_TEST_REDIS_URL is set."""
    a, b = _instances(request, env, world, tmp_path)
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(params=BACKENDS)
def consent_pair(request, env, world, ehr, tmp_path):
    """Two instances started after the trust was made to require consent: a trust change
    reaches a running worker within the reload interval (not at once), which is not what
    the consent tests are about."""
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET,
          "--consent", "required")
    a, b = _instances(request, env, world, tmp_path)
    yield a, b
    a.stop()
    b.stop()


def test_rotation_reaches_every_worker_of_every_instance_within_seconds(pair, world, ehr):
    a, b = pair
    old = {jwt.get_unverified_header(i.exchange(ehr).json()["access_token"])["kid"] for i in (a, b)}
    world("keys", "rotate")
    new = [k["kid"] for k in __import__("json").loads(world("keys", "list", "--json").output) if k["state"] == "active"]

    def all_new():
        kids = {jwt.get_unverified_header(i.exchange(ehr).json()["access_token"])["kid"] for i in (a, b) for _ in range(4)}
        return kids == set(new)
    assert until(5, all_new)
    assert old.isdisjoint(new)


def test_trust_removed_by_cli_is_refused_by_every_instance_within_seconds(pair, world, ehr):
    a, b = pair
    assert a.exchange(ehr).status_code == 200 and b.exchange(ehr).status_code == 200
    world("trust", "remove", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET)
    assert until(5, lambda: all(i.exchange(ehr).status_code == 400 for i in (a, b) for _ in range(4)))


def test_revocation_at_one_instance_holds_at_the_other(pair, ehr):
    a, b = pair
    token = a.exchange(ehr).json()["access_token"]
    assert requests.post(a.base + "/revoke", data={"token": token}, auth=("vendor", VENDOR_SECRET), timeout=10).ok
    r = requests.post(b.base + "/introspect", data={"token": token}, auth=("hospital-b", TARGET_SECRET), timeout=10)
    assert r.json() == {"active": False}


def test_assertion_jti_spent_at_one_instance_is_refused_at_the_other(pair, world, ehr, tmp_path):
    import json

    from test_private_key_jwt import VendorKeys
    a, b = pair
    keys = VendorKeys("ES384", "k1")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [keys.jwk()]}))
    world("client", "add", "backend", "--jwks-file", str(tmp_path / "jwks.json"))
    world("trust", "add", "--client", "backend", "--issuer", ehr.issuer, "--target", TARGET,
          "--scopes", "patient/*.rs", "--upstream-client-id", "vendor-at-ehr")
    assertion = keys.assertion(aud="http://te.test/token", jti=uuid.uuid4().hex)
    form = {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}
    # the new client reaches both running instances within seconds
    assert until(5, lambda: b.exchange(ehr, data=dict(form, client_assertion=keys.assertion(aud="http://te.test/token")),
                                       auth=None).status_code == 200)
    assert until(5, lambda: a.exchange(ehr, data=dict(form, client_assertion=keys.assertion(aud="http://te.test/token")),
                                       auth=None).status_code == 200)
    assert a.exchange(ehr, data=form, auth=None).status_code == 200
    r = b.exchange(ehr, data=form, auth=None)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"


def test_jwt_grant_jti_spent_at_one_instance_is_refused_at_the_other(pair, world, ehr):
    from test_jwt_grant import JWT_BEARER, make_grant
    a, b = pair
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--allow-jwt-grant")

    def present(instance, assertion):
        return requests.post(instance.base + "/token", data={"grant_type": JWT_BEARER, "assertion": assertion,
                                                             "resource": TARGET, "scope": "patient/Observation.rs"},
                             auth=("vendor", VENDOR_SECRET), timeout=10)
    # the trust's change reaches both running instances within seconds
    assert until(5, lambda: all(present(i, make_grant(ehr)).status_code == 200 for i in (a, b) for _ in range(4)))
    grant = make_grant(ehr)
    assert present(a, grant).status_code == 200
    r = present(b, grant)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


def test_a_removed_link_is_refused_by_every_instance_within_seconds(pair, world, ehr):
    """Table links are kept in memory per configuration generation: removing one (an admin
    change, a generation bump) reaches every worker of every instance like any other change."""
    from fakes import SOURCE
    a, b = pair
    patient_scope = {"scope": "patient/Observation.rs"}
    assert all(i.exchange(ehr, data=patient_scope).json()["patient"] == "b-456"
               for i in (a, b) for _ in range(4))  # read, and kept
    world("link", "remove", "--source", SOURCE, "--patient", "a-123", "--target", TARGET)

    def refused_everywhere():  # no patient at the target: no patient scope (rule 7)
        answers = [i.exchange(ehr, data=patient_scope) for i in (a, b) for _ in range(4)]
        return all(r.status_code == 400 and r.json()["error"] == "invalid_scope" for r in answers)
    assert until(5, refused_everywhere)


def test_a_withdrawn_consent_is_refused_by_every_instance_at_once(consent_pair, world, ehr, env):
    """Consents are read from the database on every exchange (never kept in memory): the
    first exchange after a withdrawal, at any instance, is refused."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import insert, select

    from fakes import SOURCE
    from token_exchange.db import make_engine
    from token_exchange.models import Consent, Target
    a, b = consent_pair
    asked = {"scope": "patient/Observation.rs"}

    def not_refused():
        answers = [i.exchange(ehr, data=asked) for i in (a, b) for _ in range(4)]
        return [r.status_code for r in answers if r.status_code != 400 or r.json()["error"] != "consent_required"]
    assert not_refused() == []
    # user-1's consent for patient a-123, as the approval page records it
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    now = datetime.now(timezone.utc)
    consent_id = uuid.uuid4().hex
    with engine.begin() as conn:
        target_id = conn.execute(select(Target.id).where(Target.base_url == TARGET)).scalar_one()
        conn.execute(insert(Consent).values(
            id=consent_id, issuer=ehr.issuer, sub="user-1", signer=None, source=SOURCE, patient="a-123",
            client_id="vendor", target_id=target_id, scopes="patient/*.rs", granted=now,
            expires=now + timedelta(days=30), decision="granted"))
    engine.dispose()
    assert all(i.exchange(ehr, data=asked).status_code == 200 for i in (a, b) for _ in range(4))
    world("consent", "withdraw", consent_id)
    assert not_refused() == []
