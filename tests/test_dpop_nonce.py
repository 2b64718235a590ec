"""DPoP server nonces (RFC 9449 §8) under TOKEN_EXCHANGE_DPOP_NONCE=on, and a proof's
jti spent once across instances: nonces are derived (an HMAC over a one-minute window,
keyed from the key every instance loads), so any instance accepts any other's with no
row per nonce; jtis go to the replay store every instance shares (the database, with
Redis as its fast path when configured)."""
from __future__ import annotations

import time

import pytest

from conftest import REDIS_URL, VENDOR_SECRET, post_token
from dpop_helpers import Prover
from test_token import error_of

ACCEL = [None] + ([REDIS_URL] if REDIS_URL else [])


@pytest.fixture(params=ACCEL, ids=lambda u: "redis" if u else "database")
def instances(request, env, world):
    """Two apps (instances) on one database, with DPoP nonces on; and Redis when set."""
    from token_exchange import create_app
    extra = {"TOKEN_EXCHANGE_DPOP_NONCE": "on"}
    if request.param:
        extra["TOKEN_EXCHANGE_REDIS_URL"] = request.param
    apps = [create_app(env=dict(env, **extra)) for _ in range(2)]
    yield [a.test_client() for a in apps]
    for a in apps:
        a.extensions["token_exchange"].store.close()
        a.extensions["token_exchange"].engine.dispose()


@pytest.fixture(scope="module")
def key():
    return Prover("ES384")


def send(http, exchange_factory, p=None, **proof):
    return exchange_factory(http, headers={"DPoP": p.proof(**proof)} if p else None)


def test_a_proof_without_a_nonce_is_use_dpop_nonce_with_a_fresh_nonce_to_retry_with(instances, exchange_factory, key):
    a, _ = instances
    r = send(a, exchange_factory, key)
    error_of(r, 400, "use_dpop_nonce")
    nonce = r.headers["DPoP-Nonce"]
    r = send(a, exchange_factory, key, nonce=nonce)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["token_type"] == "DPoP" and r.headers["DPoP-Nonce"]


def test_a_nonce_issued_by_one_instance_is_accepted_by_another(instances, exchange_factory, key):
    a, b = instances
    nonce = send(a, exchange_factory, key).headers["DPoP-Nonce"]
    r = send(b, exchange_factory, key, nonce=nonce)
    assert r.status_code == 200, r.get_json()


def test_every_token_answer_carries_a_current_nonce(instances, exchange_factory, key):
    a, b = instances
    answers = [exchange_factory(a), post_token(b, {"grant_type": "password"}),
               post_token(a, {"grant_type": "password"}, auth=("vendor", "wrong")),
               send(b, exchange_factory, key, nonce="made-up")]
    assert [r.status_code for r in answers] == [200, 400, 401, 400]
    nonces = [r.headers.get("DPoP-Nonce") for r in answers]
    assert all(nonces)
    assert send(a, exchange_factory, key, nonce=nonces[2]).status_code == 200


@pytest.mark.parametrize("nonce", ["made-up", "", "1.abc", "99999999999.abc", "x" * 200])
def test_a_nonce_the_service_did_not_issue_is_use_dpop_nonce(instances, exchange_factory, key, nonce):
    error_of(send(instances[0], exchange_factory, key, nonce=nonce), 400, "use_dpop_nonce")


def test_a_nonce_of_the_last_five_minutes_is_accepted_and_an_older_or_future_one_is_not(instances,
                                                                                         exchange_factory, key, app):
    """Nonces live in one-minute windows: the current one and the five before it are good.
    The windows asked for keep their outcome should the minute turn during the test."""
    nonces = app.extensions["token_exchange"].nonces
    now = int(time.time()) // 60
    assert send(instances[0], exchange_factory, key, nonce=nonces.of_window(now - 4)).status_code == 200
    error_of(send(instances[1], exchange_factory, key, nonce=nonces.of_window(now - 7)), 400, "use_dpop_nonce")
    error_of(send(instances[1], exchange_factory, key, nonce=nonces.of_window(now + 2)), 400, "use_dpop_nonce")


def test_an_otherwise_bad_proof_is_invalid_dpop_proof_before_its_nonce_is_asked(instances, exchange_factory, key):
    error_of(send(instances[0], exchange_factory, key, htm="GET"), 400, "invalid_dpop_proof")


def test_a_proof_spent_at_one_instance_is_refused_at_the_other(instances, exchange_factory, key):
    a, b = instances
    nonce = send(a, exchange_factory, key).headers["DPoP-Nonce"]
    proof = key.proof(nonce=nonce)
    assert exchange_factory(a, headers={"DPoP": proof}).status_code == 200
    error_of(exchange_factory(b, headers={"DPoP": proof}), 400, "invalid_dpop_proof")
    error_of(exchange_factory(a, headers={"DPoP": proof}), 400, "invalid_dpop_proof")


def test_nonces_are_off_by_default(exchange, key):
    r = exchange(headers={"DPoP": key.proof()})
    assert r.status_code == 200 and "DPoP-Nonce" not in r.headers


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_a_dpop_nonce_setting_other_than_on_or_off_is_refused_at_start(value):
    from token_exchange.settings import Settings, SettingsError
    with pytest.raises(SettingsError, match="TOKEN_EXCHANGE_DPOP_NONCE"):
        Settings.from_env({"TOKEN_EXCHANGE_DPOP_NONCE": value})


def test_the_nonce_names_no_secret(instances, exchange_factory, app):
    """A nonce is a window number and a MAC: it reveals neither key nor secret."""
    nonce = exchange_factory(instances[0]).headers["DPoP-Nonce"]
    window, _, mac = nonce.partition(".")
    assert window.isdigit() and len(mac) == 24
    assert VENDOR_SECRET not in nonce
