"""Issue 25, items 8 and 12: `token revoke` by jti, client, trust, source patient or
user (one rule per command, honoured by every instance at /introspect), revocation by
`trust remove`, `client remove`, `client disable` and `link remove`, `client
disable|enable`, and POST /revoke and failed authentication at /introspect and /revoke
logged and audited."""
from __future__ import annotations

import json
import logging
import re
import time

import pytest
import requests

from conftest import OTHER_SECRET, TARGET_SECRET, VENDOR_SECRET, audit_rows
from fakes import SOURCE, TARGET, TARGET2, UPSTREAM
from test_lifecycle import basic, introspect
from test_scaleout import pair, until  # noqa: F401  (pair: two instances on one database)
from test_token import error_of

USER = SOURCE + "/Practitioner/p1"


def active(http, token) -> bool:
    return introspect(http, token).get_json()["active"]


@pytest.fixture
def mint(exchange, ehr):
    """mint(client=, patient=, user=, target=) -> a token minted now (200 asserted)."""
    def do(client="vendor", patient="a-123", user=USER, target=TARGET):
        secret = VENDOR_SECRET if client == "vendor" else OTHER_SECRET
        scope = "patient/Observation.rs" if target == TARGET else "user/Observation.rs"
        r = exchange(auth=(client, secret), actor_token=ehr.id_token(patient=patient, fhirUser=user),
                     resource=target, scope=scope)
        assert r.status_code == 200, r.get_json()
        return r.get_json()["access_token"]
    return do


@pytest.fixture
def later():
    """Wait for the clock to reach the next whole second, so tokens minted from then on
    are 'minted after the rule' (iat is in whole seconds, and a rule covers the tokens
    issued in its own second too). A poll with a deadline: at most a second."""
    def wait():
        boundary = int(time.time()) + 1
        assert until(3, lambda: time.time() >= boundary)
    return wait


@pytest.fixture
def wider(world, ehr):
    """Beside the standard world: 'other' trusted for A -> B, 'vendor' for A -> C, and a
    second linked patient a-999 -> b-999 at B."""
    world("trust", "add", "--client", "other", "--issuer", ehr.issuer, "--target", TARGET,
          "--scopes", "patient/*.rs user/*.rs", "--upstream-client-id", UPSTREAM)
    world("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET2,
          "--scopes", "user/*.rs", "--upstream-client-id", UPSTREAM)
    world("link", "add", "--source", SOURCE, "--patient", "a-999", "--target", TARGET, "--target-patient", "b-999")
    return world


def introspect_at(http, token, target):
    user, pw = ("hospital-b", TARGET_SECRET) if target == TARGET else ("clinic-c", "target-C-secret-0123456789abcdef0123")
    return http.post("/introspect", data={"token": token}, headers=basic(user, pw)).get_json()["active"]


# -- each form covers exactly its tokens ---------------------------------------------------------
def test_revoke_by_jti_makes_that_token_inactive_and_no_other(http, world, mint):
    one, two = mint(), mint()
    jti = json.loads(introspect(http, one).data)["jti"]
    out = world("token", "revoke", "--jti", jti).output
    assert "covers 1 audited grant(s)" in out
    assert not active(http, one) and active(http, two)


def test_revoke_by_client_covers_that_clients_tokens_only(http, wider, mint, later):
    mine, theirs = mint(), mint(client="other")
    out = wider("token", "revoke", "--client", "vendor").output
    assert "covers 1 audited grant(s)" in out
    assert not active(http, mine) and active(http, theirs)
    later()
    assert active(http, mint())  # minted after the rule


def test_revoke_by_trust_covers_that_trust_only(http, wider, ehr, mint, later):
    at_b, at_c, other_at_b = mint(), mint(target=TARGET2), mint(client="other")
    wider("token", "revoke", "--trust", "--client", "vendor", "--issuer", ehr.issuer, "--target", "hospital-b")
    assert not introspect_at(http, at_b, TARGET)
    assert introspect_at(http, at_c, TARGET2) and introspect_at(http, other_at_b, TARGET)
    later()
    assert active(http, mint())


def test_revoke_by_source_patient_covers_that_patients_tokens_at_every_target(http, wider, mint, later):
    """The token carries the target's patient id; the source patient is read from its audit record."""
    a123, a999, other_a123 = mint(), mint(patient="a-999"), mint(client="other")
    out = wider("token", "revoke", "--source", SOURCE, "--patient", "a-123").output
    assert "covers 2 audited grant(s)" in out
    assert not active(http, a123) and not active(http, other_a123)
    assert active(http, a999)
    later()
    assert active(http, mint())


def test_revoke_by_source_patient_with_a_target_leaves_other_targets(http, wider, mint):
    at_b, at_c = mint(), mint(target=TARGET2)
    out = wider("token", "revoke", "--source", SOURCE, "--patient", "a-123", "--target", TARGET2).output
    assert "covers 1 audited grant(s)" in out
    assert introspect_at(http, at_b, TARGET) and not introspect_at(http, at_c, TARGET2)


def test_revoke_by_user_covers_that_users_tokens_only(http, world, mint, later):
    mine, theirs = mint(), mint(user=SOURCE + "/Practitioner/p2")
    out = world("token", "revoke", "--user", USER).output
    assert "covers 1 audited grant(s)" in out  # the audit records the source user
    assert not active(http, mine) and active(http, theirs)
    later()
    assert active(http, mint())


@pytest.mark.parametrize("args", [[], ["--jti", "x", "--client", "vendor"], ["--trust", "--client", "vendor"],
                                  ["--patient", "a-123"], ["--issuer", "http://x.test"],
                                  ["--client", "vendor", "--target", TARGET]])
def test_revoke_takes_exactly_one_form(world, args):
    r = world("token", "revoke", *args, check=False)
    assert r.exit_code == 1 and r.stderr.startswith("error: give exactly one of: --jti JTI")
    assert r.stderr.count("\n") == 1


def test_revoke_of_an_unknown_client_is_one_error_line(world):
    r = world("token", "revoke", "--client", "nobody", check=False)
    assert r.exit_code == 1 and r.stderr == "error: no client 'nobody'\n"


def test_revoke_is_one_rule_row_an_admin_event_and_an_audit_record(http, world, mint, app):
    for _ in range(3):
        mint()
    out = world("token", "revoke", "--client", "vendor").output
    assert re.match(r"revoked: client client_id=vendor, tokens issued before \S+; covers 3 audited grant\(s\)\n",
                    out)
    from sqlalchemy import func, select

    from token_exchange.models import RevocationRule
    with app.extensions["token_exchange"].engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(RevocationRule)).scalar() == 1
    admin = [e for e in json.loads(world("audit", "list", "--admin", "--json").output)
             if e["action"] == "token.revoke"]
    assert len(admin) == 1 and admin[0]["detail"].startswith("client client_id=vendor before ")
    (rec,) = audit_rows(world, "--event", "token-revoke")
    assert rec["client_id"] == "vendor" and rec["outcome"] == "granted"
    assert "by test-admin" in rec["reason"] and "covers 3 audited grant(s)" in rec["reason"]


# -- removals and client disable revoke ----------------------------------------------------------
def test_trust_remove_revokes_the_tokens_minted_under_it(http, world, ehr, mint):
    token = mint()
    world("trust", "remove", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET)
    assert not active(http, token)


def test_client_remove_revokes_its_tokens_even_if_added_again(http, world, mint):
    token = mint()
    world("client", "remove", "vendor", "--yes")
    assert not active(http, token)
    world("client", "add", "vendor", "--secret-env", "VENDOR_SECRET")
    assert not active(http, token)


def test_issuer_remove_revokes_the_tokens_minted_under_the_trusts_it_deletes(http, wider, ehr, mint):
    at_b, at_c = mint(), mint(target=TARGET2)
    wider("issuer", "remove", ehr.issuer, "--yes")
    assert not active(http, at_b) and not introspect_at(http, at_c, TARGET2)


def test_target_remove_revokes_the_tokens_minted_for_it_even_if_added_again(http, wider, mint):
    at_b, at_c = mint(), mint(target=TARGET2)
    wider("target", "remove", "clinic-c", "--yes")
    wider("target", "add", TARGET2, "--name", "clinic-c", "--introspection-secret-env", "TARGET2_SECRET")
    assert not introspect_at(http, at_c, TARGET2) and active(http, at_b)


def test_link_remove_revokes_the_tokens_minted_on_the_link(http, wider, mint):
    on_link, other_patient = mint(), mint(patient="a-999")
    wider("link", "remove", "--source", SOURCE, "--patient", "a-123", "--target", TARGET)
    assert not active(http, on_link) and active(http, other_patient)


def test_link_block_of_a_matched_link_revokes_the_tokens_minted_on_it(http, world, app, mint):
    store = app.extensions["token_exchange"].store
    target_id = store.config().targets_by_url[TARGET].id
    store.store_matched_link(SOURCE, "a-555", target_id, "b-wrong", "urn:mrn", False, "service", "a wrong match")
    on_wrong_link, other_patient = mint(patient="a-555"), mint()
    assert introspect(http, on_wrong_link).get_json()["patient"] == "b-wrong"
    world("link", "block", "--source", SOURCE, "--patient", "a-555", "--target", TARGET)
    assert not active(http, on_wrong_link) and active(http, other_patient)


def test_disabled_client_is_refused_everywhere_and_its_tokens_are_inactive(http, world, exchange, mint):
    token = mint()
    assert "disabled" in world("client", "disable", "vendor").output
    r = exchange()
    error_of(r, 401, "invalid_client")
    assert "disabled" in r.get_json()["error_description"]
    r = http.post("/revoke", data={"token": token}, headers=basic("vendor", VENDOR_SECRET))
    error_of(r, 401, "invalid_client")
    assert "disabled" in r.get_json()["error_description"]
    assert not active(http, token)


def test_enable_lets_the_client_ask_again_and_revoked_tokens_stay_revoked(http, world, mint, later):
    token = mint()
    world("client", "disable", "vendor")
    world("client", "enable", "vendor")
    later()
    fresh = mint()
    assert active(http, fresh) and not active(http, token)
    assert http.post("/revoke", data={"token": fresh}, headers=basic("vendor", VENDOR_SECRET)).status_code == 200


def test_client_list_and_show_show_the_disabled_state(world):
    world("client", "disable", "other")
    rows = {r["client_id"]: r for r in json.loads(world("client", "list", "--json").output)}
    assert rows["other"]["disabled"] is True and rows["vendor"]["disabled"] is False
    table = world("client", "list").output.splitlines()
    assert table[0].split()[-1] == "disabled"
    assert "disabled: yes" in world("client", "show", "other").output
    assert json.loads(world("client", "show", "vendor", "--json").output)["disabled"] is False


# -- every instance honours a rule the CLI adds --------------------------------------------------
def test_a_rule_added_by_the_cli_is_honoured_by_both_instances(pair, world, ehr):  # noqa: F811
    a, b = pair
    tokens = [i.exchange(ehr).json()["access_token"] for i in (a, b)]

    def inactive_everywhere():
        return all(requests.post(i.base + "/introspect", data={"token": t}, auth=("hospital-b", TARGET_SECRET),
                                 timeout=10).json() == {"active": False} for i in (a, b) for t in tokens)
    assert not inactive_everywhere()
    world("token", "revoke", "--client", "vendor")
    assert until(5, inactive_everywhere)


def test_a_client_disabled_by_the_cli_is_refused_by_both_instances(pair, world, ehr):  # noqa: F811
    a, b = pair
    world("client", "disable", "vendor")
    assert until(5, lambda: all(i.exchange(ehr).status_code == 401 for i in (a, b) for _ in range(4)))
    world("client", "enable", "vendor")
    assert until(5, lambda: all(i.exchange(ehr).status_code == 200 for i in (a, b) for _ in range(4)))


# -- the hot path -------------------------------------------------------------------------------
def test_post_token_never_asks_the_revocation_rules(world, exchange, monkeypatch):
    from token_exchange.revocation import RuleSet

    def boom(*a, **kw):
        raise AssertionError("POST /token asked the revocation rules")
    world("token", "revoke", "--user", USER)
    monkeypatch.setattr(RuleSet, "covers", boom)
    assert exchange().status_code == 200


# -- item 8: POST /revoke and failed authentication are logged and audited -----------------------
class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def decisions():
    h = Lines()
    logger = logging.getLogger("token_exchange.decision")
    logger.addHandler(h)
    yield h.records
    logger.removeHandler(h)


def test_a_revocation_is_one_decision_line_and_a_revoke_audit_record(http, world, mint, decisions):
    token = mint()
    jti = introspect(http, token).get_json()["jti"]
    decisions.clear()
    r = http.post("/revoke", data={"token": token}, headers=basic("vendor", VENDOR_SECRET))
    assert r.status_code == 200
    (line,) = decisions
    assert line.getMessage() == "revoked" and line.endpoint == "revoke"
    assert line.client_id == "vendor" and line.jti == jti
    (rec,) = audit_rows(world, "--event", "revoke")
    assert rec["client_id"] == "vendor" and rec["jti"] == jti and rec["outcome"] == "granted"
    assert rec["request_id"] == r.headers["X-Request-Id"]


def test_failed_client_authentication_at_revoke_is_a_decision_line(http, world, mint, decisions):
    token = mint()
    decisions.clear()
    r = http.post("/revoke", data={"token": token}, headers=basic("vendor", "w" * 40))
    error_of(r, 401, "invalid_client")
    (line,) = decisions
    assert line.getMessage() == "refused" and line.endpoint == "revoke" and line.client_id == "vendor"
    assert line.error == "invalid_client" and "w" * 40 not in str(line.__dict__)
    assert audit_rows(world, "--event", "revoke") == []


def test_failed_target_authentication_at_introspect_is_a_decision_line(http, world, mint, decisions):
    token = mint()
    decisions.clear()
    r = introspect(http, token, "hospital-b", "w" * 40)
    error_of(r, 401, "invalid_client")
    (line,) = decisions
    assert line.getMessage() == "refused" and line.endpoint == "introspect" and line.target == "hospital-b"
    assert line.reason == "wrong secret for the target" and "w" * 40 not in str(line.__dict__)


def test_revoking_another_clients_token_is_logged_and_audited_as_refused(http, wider, mint, decisions):
    token = mint()
    decisions.clear()
    error_of(http.post("/revoke", data={"token": token}, headers=basic("other", OTHER_SECRET)),
             400, "unauthorized_client")
    (line,) = decisions
    assert line.getMessage() == "refused" and line.client_id == "other"
    (rec,) = audit_rows(wider, "--event", "revoke")
    assert rec["outcome"] == "refused" and rec["error"] == "unauthorized_client" and rec["client_id"] == "other"
