"""A real DPoP client: panva's oauth4webapi (tests/dpop_client/client.mjs, run by node)
finds the token endpoint by discovery, sends a token exchange with a proof from its
own key, and retries once on use_dpop_nonce; the service binds the token to that key.

Needs `node` and `npm ci --prefix tests/dpop_client`; skips with the reason otherwise,
and fails instead under TOKEN_EXCHANGE_TEST_REQUIRE_ALL=1 (as CI runs)."""
from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from conftest import AT, DPOP_CLIENT, IDT, TE, VENDOR_SECRET, audit_rows
from conftest import dpop_client_unavailable as unavailable
from fakes import TARGET
from fhirserver import require_all
from test_token import claims_of

HERE = Path(DPOP_CLIENT)

if unavailable() and not require_all():
    pytest.skip(unavailable(), allow_module_level=True)


@pytest.fixture
def served(env, world):
    """The service over real HTTP on loopback, its issuer URL the address it is served at
    (so discovery's token_endpoint is where the client sends its proofs)."""
    if unavailable():
        pytest.fail(unavailable())
    from token_exchange import create_app
    holder = {}
    server = make_server("127.0.0.1", 0, lambda e, s: holder["app"](e, s), threaded=True)
    url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def start(**extra):
        holder["app"] = create_app(env=dict(env, TOKEN_EXCHANGE_ISSUER=url, **extra))
        return holder["app"]
    yield url, start
    server.shutdown()
    server.server_close()
    if "app" in holder:
        holder["app"].extensions["token_exchange"].store.close()
        holder["app"].extensions["token_exchange"].engine.dispose()


def run_client(issuer, parameters, requests=1, alg="ES256", grant_type=TE):
    inp = {"issuer": issuer, "client_id": "vendor", "client_secret": VENDOR_SECRET, "grant_type": grant_type,
           "parameters": parameters, "requests": requests, "alg": alg}
    out = subprocess.run(["node", str(HERE / "client.mjs")], input=json.dumps(inp), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def exchange_params(ehr):
    return {"subject_token": ehr.access_token(), "subject_token_type": AT, "actor_token": ehr.id_token(),
            "actor_token_type": IDT, "resource": TARGET, "scope": "patient/Observation.rs"}


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256"])
def test_oauth4webapi_sends_a_proof_and_gets_a_token_bound_to_its_key(served, ehr, world, alg):
    url, start = served
    app = start()
    out = run_client(url, exchange_params(ehr), alg=alg)
    (result,) = out["results"]
    assert result.get("token_type", "").lower() == "dpop", result
    assert out["attempts"] == 1
    claims = claims_of(app.test_client(), result["access_token"])
    assert claims["cnf"] == {"jkt": out["jkt"]}
    (row,) = audit_rows(world)
    assert row["dpop_jkt"] == out["jkt"] and row["outcome"] == "granted"


def test_oauth4webapi_retries_with_the_nonce_the_service_asks_for(served, ehr):
    url, start = served
    app = start(TOKEN_EXCHANGE_DPOP_NONCE="on")
    out = run_client(url, exchange_params(ehr), requests=2)
    assert [r.get("token_type", "").lower() for r in out["results"]] == ["dpop", "dpop"], out["results"]
    assert out["attempts"] == 3  # the first request asked again with the nonce; the second had it already
    for r in out["results"]:
        assert claims_of(app.test_client(), r["access_token"])["cnf"] == {"jkt": out["jkt"]}


def test_oauth4webapi_presents_a_bound_ehr_token_only_with_its_own_key(served, ehr):
    """The EHR bound its token to some other key: the client's proof cannot unlock it."""
    url, start = served
    start()
    params = dict(exchange_params(ehr), subject_token=ehr.access_token(cnf={"jkt": "A" * 43}))
    (result,) = run_client(url, params)["results"]
    assert result["error"] == "invalid_request", result


def test_oauth4webapi_jwt_grant_with_dpop(served, ehr, world):
    from test_jwt_grant import JWT_BEARER, make_grant
    url, start = served
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--allow-jwt-grant",
          "--require-dpop")
    start()
    # the grant is addressed to the service at the address it is served at
    out = run_client(url, {"assertion": make_grant(ehr, aud=url), "resource": TARGET}, grant_type=JWT_BEARER)
    (result,) = out["results"]
    assert result.get("token_type", "").lower() == "dpop", result
