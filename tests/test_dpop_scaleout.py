"""DPoP across two real instances (`token-exchange serve`, two gunicorn workers each, on
one database; with Redis too when TOKEN_EXCHANGE_TEST_REDIS_URL is set): a proof's jti
is spent once for all of them, and a nonce one instance issued is good at the other.
The instances are reached at loopback while their issuer is http://te.test: the proof
names the token endpoint discovery publishes, as behind a proxy."""
from __future__ import annotations

import pytest
import requests

from conftest import AT, IDT, REDIS_URL, TE, VENDOR_SECRET
from dpop_helpers import Prover
from fakes import TARGET
from test_scaleout import Instance


@pytest.fixture(params=["database"] + (["database+redis"] if REDIS_URL else []))
def pair(request, env, world, tmp_path):
    env = {k: v for k, v in env.items() if k != "TOKEN_EXCHANGE_RELOAD_INTERVAL"}
    env["TOKEN_EXCHANGE_DPOP_NONCE"] = "on"
    if request.param == "database+redis":
        env["TOKEN_EXCHANGE_REDIS_URL"] = REDIS_URL
    a, b = Instance(env, tmp_path), Instance(env, tmp_path)
    yield a, b
    a.stop()
    b.stop()


def post(instance, ehr, proof):
    data = {"grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
            "actor_token": ehr.id_token(), "actor_token_type": IDT, "resource": TARGET}
    return requests.post(instance.base + "/token", data=data, auth=("vendor", VENDOR_SECRET),
                         headers={"DPoP": proof}, timeout=10)


def test_nonce_and_jti_hold_across_instances_and_their_workers(pair, ehr):
    a, b = pair
    key = Prover("ES256")
    r = post(a, ehr, key.proof())
    assert r.status_code == 400 and r.json()["error"] == "use_dpop_nonce"
    nonce = r.headers["DPoP-Nonce"]
    proof = key.proof(nonce=nonce)
    r = post(b, ehr, proof)  # a's nonce, at b
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "DPoP" and r.headers["DPoP-Nonce"]
    for instance in (a, b, a, b):  # whichever worker of either instance answers, the proof is spent
        r = post(instance, ehr, proof)
        assert r.status_code == 400 and r.json()["error"] == "invalid_dpop_proof", r.text
