"""Redis as an accelerator (TOKEN_EXCHANGE_REDIS_URL): shared rate-limit counters,
a replay fast path, change notifications; and Redis going away changes no answer."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from conftest import REDIS_URL, post_token
from fakes import TARGET, UPSTREAM, TCPProxy
from test_token import error_of

pytestmark = pytest.mark.skipif(not REDIS_URL, reason="needs Redis: set TOKEN_EXCHANGE_TEST_REDIS_URL")


def apps(env, n=2, **extra):
    from token_exchange import create_app
    return [create_app(env=dict(env, **extra)) for _ in range(n)]


def test_rate_limit_is_shared_by_instances_through_redis(world, env):
    a, b = (x.test_client() for x in apps(env, TOKEN_EXCHANGE_REDIS_URL=REDIS_URL, TOKEN_EXCHANGE_RATE_LIMIT="3"))
    data = {"grant_type": "client_credentials"}
    assert [post_token(a, data).status_code, post_token(b, data).status_code,
            post_token(a, data).status_code] == [400, 400, 400]
    error_of(post_token(b, data), 429, "temporarily_unavailable")


def test_spent_assertion_is_refused_from_redis_and_recorded_in_the_database(world, env, ehr, tmp_path):
    import redis

    from test_private_key_jwt import VendorKeys, form
    keys = VendorKeys("RS384", "k")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [keys.jwk()]}))
    world("client", "add", "backend", "--jwks-file", str(tmp_path / "jwks.json"))
    world("trust", "add", "--client", "backend", "--issuer", ehr.issuer, "--target", TARGET,
          "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
    (app,) = apps(env, 1, TOKEN_EXCHANGE_REDIS_URL=REDIS_URL)
    http = app.test_client()
    a = keys.assertion(jti=uuid.uuid4().hex)
    assert post_token(http, form(ehr, a), auth=None).status_code == 200
    accel = app.extensions["token_exchange"].store.accel
    assert redis.Redis.from_url(REDIS_URL).exists(accel._jti_key("backend", jwt_jti(a)))
    error_of(post_token(http, form(ehr, a), auth=None), 401, "invalid_client")
    # the database holds it too: without Redis the replay is still refused
    (plain,) = apps(env, 1)
    error_of(post_token(plain.test_client(), form(ehr, a), auth=None), 401, "invalid_client")


def jwt_jti(token):
    import jwt
    return jwt.decode(token, options={"verify_signature": False})["jti"]


def test_change_notification_reloads_workers_before_the_poll_interval(world, env, ehr, exchange_factory):
    (app,) = apps(env, 1, TOKEN_EXCHANGE_REDIS_URL=REDIS_URL, TOKEN_EXCHANGE_RELOAD_INTERVAL="3600")
    http = app.test_client()
    assert exchange_factory(http).status_code == 200  # loads config, starts the listener
    world.env = dict(world.env, TOKEN_EXCHANGE_REDIS_URL=REDIS_URL)
    world("trust", "remove", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET)
    deadline = time.monotonic() + 5
    while exchange_factory(http).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    error_of(exchange_factory(http), 400, "unauthorized_client")


def test_redis_going_away_changes_no_answer(world, env, ehr, exchange_factory):
    from sqlalchemy.engine import make_url
    url = make_url(REDIS_URL)
    proxy = TCPProxy(url.port or 6379, url.host or "127.0.0.1")
    redis_url = f"redis://127.0.0.1:{proxy.port}/{url.database or 0}"
    (app,) = apps(env, 1, TOKEN_EXCHANGE_REDIS_URL=redis_url, TOKEN_EXCHANGE_RATE_LIMIT="4")
    http = app.test_client()
    assert exchange_factory(http).status_code == 200
    proxy.down()
    assert exchange_factory(http).status_code == 200  # Redis gone: same answer
    assert exchange_factory(http).status_code == 200
    error_of(exchange_factory(http, scope="patient/Observation.c"), 400, "invalid_scope")
    error_of(exchange_factory(http), 429, "temporarily_unavailable")  # in-process counter takes over
