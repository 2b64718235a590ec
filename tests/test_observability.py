"""What operators see (contract "Audit fields added"; issue "Operators and admins"):
one structured log line per decision, granted or refused, naming the request id,
client, issuer, target, error code and internal reason and never a token; the
request id and the reason also kept on the audit record."""
from __future__ import annotations

import json
import logging

import pytest

from conftest import VENDOR_SECRET, audit_rows, post_token
from fakes import TARGET
from token_exchange.logs import JSONFormatter


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.setFormatter(JSONFormatter())
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture
def decisions():
    h = Lines()
    logger = logging.getLogger("token_exchange.decision")
    logger.addHandler(h)
    yield h.lines
    logger.removeHandler(h)


def test_a_refused_exchange_is_one_log_line_with_ids_issuer_target_error_and_reason(exchange, ehr, decisions):
    at = ehr.access_token(client="another-app")
    r = exchange(subject_token=at, headers={"X-Request-Id": "req-42"})
    assert r.status_code == 400
    (line,) = decisions
    assert at not in line and at.split(".")[1] not in line
    rec = json.loads(line)
    assert rec["msg"] == "refused" and rec["request_id"] == "req-42" and rec["client_id"] == "vendor"
    assert rec["issuer"] == ehr.issuer and rec["target"] == TARGET and rec["error"] == "invalid_request"
    assert "another-app" in rec["reason"] and rec["grant"] == "token-exchange"


def test_a_granted_exchange_is_one_log_line_too(exchange, decisions):
    r = exchange()
    assert r.status_code == 200
    (line,) = decisions
    rec = json.loads(line)
    assert rec["msg"] == "granted" and rec["client_id"] == "vendor" and rec["target"] == TARGET
    assert rec["request_id"] == r.headers["X-Request-Id"] and rec["link"] == "table"
    assert r.get_json()["access_token"] not in line


def test_failed_client_authentication_is_logged_with_the_client_id_and_not_audited(http, world, decisions):
    r = post_token(http, {"grant_type": "x"}, auth=("vendor", "wrong-secret-" + "x" * 30))
    assert r.status_code == 401
    (line,) = decisions
    rec = json.loads(line)
    assert rec["error"] == "invalid_client" and rec["request_id"] == r.headers["X-Request-Id"]
    assert "wrong-secret" not in line and VENDOR_SECRET not in line
    assert audit_rows(world) == []


@pytest.mark.parametrize("over, error", [
    ({"scope": "patient/Observation.c"}, "invalid_scope"),
    ({"resource": "https://unknown.example/fhir"}, "invalid_target"),
    ({"subject_token_type": "urn:ietf:params:oauth:token-type:refresh_token"}, "invalid_request"),
])
def test_every_refusal_stores_the_request_id_and_the_reason_on_the_audit_record(exchange, world, decisions,
                                                                                over, error):
    r = exchange(**over)
    assert r.get_json()["error"] == error
    (row,) = audit_rows(world)
    assert row["request_id"] == r.headers["X-Request-Id"] and row["error"] == error
    assert row["reason"] and row["grant"] == "token-exchange" and row["event"] == "exchange"
    assert json.loads(decisions[0])["error"] == error


def test_a_granted_exchange_audits_its_request_id_and_how_the_patient_was_mapped(exchange, world):
    r = exchange()
    (row,) = audit_rows(world)
    assert row["request_id"] == r.headers["X-Request-Id"] and row["reason"] is None
    assert row["link"] == "table" and row["grant"] == "token-exchange"


def test_unsupported_grant_types_are_audited_with_a_null_grant(http, world):
    r = post_token(http, {"grant_type": "client_credentials"})
    assert r.get_json()["error"] == "unsupported_grant_type"
    assert "token-exchange" in r.get_json()["error_description"]
    (row,) = audit_rows(world)
    assert row["grant"] is None and row["error"] == "unsupported_grant_type"
