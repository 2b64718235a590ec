"""Concurrent first exchanges for one user on two real instances (`token-exchange serve`,
two gunicorn workers each) sharing one database (and Redis, when the run has one): the
user is matched at the target (Medplum) and exactly one user link is stored."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
import requests

from conftest import AT, IDT, REDIS_URL, SERVICE, TE, VENDOR_SECRET
from fakes import UPSTREAM
from fhirserver import require_all, unavailable
from test_scaleout import Instance, until
from test_users import DOCTOR, NPI, USER_SCOPE, practitioner
from test_matching_medplum import seed

if unavailable() and not require_all():
    pytest.skip(unavailable(), allow_module_level=True)


@pytest.fixture(params=["database"] + (["database+redis"] if REDIS_URL else []))
def pair(request, env, world, tmp_path):
    env = {k: v for k, v in env.items() if k != "TOKEN_EXCHANGE_RELOAD_INTERVAL"}
    if request.param == "database+redis":
        env["TOKEN_EXCHANGE_REDIS_URL"] = REDIS_URL
        world.env = dict(world.env, TOKEN_EXCHANGE_REDIS_URL=REDIS_URL)
    a, b = Instance(env, tmp_path), Instance(env, tmp_path)
    yield a, b
    a.stop()
    b.stop()


def first_exchange(instance, ehr, target):
    return requests.post(instance.base + "/token", auth=("vendor", VENDOR_SECRET), timeout=30, data={
        "grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
        "actor_token": ehr.id_token(fhirUser_identifier=[f"{NPI}|1234567893"]), "actor_token_type": IDT,
        "resource": target, "scope": USER_SCOPE})


def test_concurrent_first_exchanges_on_two_instances_store_one_user_link(pair, world, ehr, fhir_server_factory):
    a, b = pair
    medplum = fhir_server_factory(jwks_url=a.base + "/jwks", issuer=SERVICE)
    seed(medplum, practitioner("pr-1", (NPI, "1234567893")))
    world("issuer", "update", ehr.issuer, "--user-identifier-system", NPI)
    world("target", "add", medplum.base, "--users", "mapped", "--user-match-identifier", NPI)
    world("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", medplum.base,
          "--scopes", "user/*.rs", "--upstream-client-id", UPSTREAM)
    probe = {"grant_type": "nothing"}  # both instances know the new target before the race
    assert until(10, lambda: all(requests.post(i.base + "/token", auth=("vendor", VENDOR_SECRET), timeout=10, data=dict(
        probe, grant_type=TE, subject_token="x", subject_token_type=AT, resource=medplum.base)).json()["error"]
        != "invalid_target" for i in (a, b)))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: first_exchange((a, b)[i % 2], ehr, medplum.base), range(8)))
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    users = {jwt.decode(r.json()["access_token"], options={"verify_signature": False})["fhirUser"] for r in answers}
    assert users == {medplum.base + "/Practitioner/pr-1"}
    (row,) = json.loads(world("user-link", "list", "--json").output)
    assert row["user"] == DOCTOR and row["origin"] == "matched" and row["target_user"] == "Practitioner/pr-1"
    assert 1 <= len([r for r in medplum.requests() if r["path"].startswith("/fhir/Practitioner?")]) <= 8
