"""Tests for the pure rules of token_exchange.consent.service: what a consent is
for (``consent_key``), who may sign it (``check_signer``) and the record a
decision stores (``consent_record``). Tables of plain values; the flows around
them are in test_consent.py and test_consent_browser.py."""
from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace as NS

import pytest

from token_exchange import scopes
from token_exchange.consent.service import WrongSigner, check_signer, consent_key, consent_record

EHR, SRC, SRC2 = "https://ehr.example", "https://ehr.example/fhir", "https://ehr.example/fhir2"


def rows(table):
    return [pytest.param(*row, id=row[0]) for row in table]


# -- consent_key: the patient only when a patient/ scope is at stake --
CONSENT_KEY = [
    # rule, launch source, launch patient, granted, expected (source, patient)
    ("patient scopes: the launch's patient", SRC, "a-1", "patient/Observation.rs", (SRC, "a-1")),
    ("user scopes only: no patient", SRC, "a-1", "user/Observation.rs", (SRC, "")),
    ("patient and user scopes: the patient", SRC, "a-1", "user/*.rs patient/Condition.r", (SRC, "a-1")),
    ("no launch source or patient: empty strings", None, None, "patient/Observation.rs", ("", "")),
]


@pytest.mark.parametrize("rule, source, patient, granted, expected", rows(CONSENT_KEY))
def test_consent_key(rule, source, patient, granted, expected):
    presented = NS(issuer=NS(url=EHR), sub="user-1", source=source, patient=patient)
    assert consent_key(presented, "app", 7, scopes.parse(granted)) == {
        "issuer": EHR, "sub": "user-1", "client_id": "app", "target_id": 7, "source": expected[0],
        "patient": expected[1]}


# -- check_signer: the user the app's tokens name; with --consent-signer patient, the patient themself --
def ticket(source=SRC, patient="a-1"):
    return NS(issuer=EHR, sub="user-1", client_id="app", target_id=7, source=source, patient=patient,
              scopes="patient/Observation.rs")


def cfg(signer="patient", trusted=True):
    trusts = {("app", EHR, 7): NS(consent_signer=signer)} if trusted else {}
    return NS(trusts=trusts, issuers={EHR: NS(sources=(SRC, SRC2))})


def user(sub="user-1", fhir_user=f"{SRC}/Patient/a-1", issuer=EHR):
    return {"issuer": issuer, "sub": sub, "fhirUser": fhir_user}


CHECK_SIGNER = [
    # rule, ticket, signed-in user, config, expected (None: may sign; else who must)
    ("the patient themself", ticket(), user(), cfg(), None),
    ("another sub: the user must sign", ticket(), user(sub="user-2"), cfg(), "user"),
    ("the same sub at another issuer: the user must sign", ticket(), user(issuer="https://other.example"), cfg(),
     "user"),
    ("signer patient: a user who is not the ticket's patient", ticket(), user(fhir_user=f"{SRC}/Patient/a-2"),
     cfg(), "patient"),
    ("signer patient: a practitioner", ticket(), user(fhir_user=f"{SRC}/Practitioner/p-1"), cfg(), "patient"),
    ("signer patient: no fhirUser", ticket(), user(fhir_user=None), cfg(), "patient"),
    ("signer patient: the patient on another source", ticket(), user(fhir_user=f"{SRC2}/Patient/a-1"), cfg(),
     "patient"),
    ("signer user: the user, whoever the fhirUser", ticket(), user(fhir_user=f"{SRC}/Practitioner/p-1"),
     cfg(signer="user"), None),
    ("no trust any more: the user suffices", ticket(), user(fhir_user=None), cfg(trusted=False), None),
    ("no patient at stake: any patient on the ticket's source", ticket(patient=""),
     user(fhir_user=f"{SRC}/Patient/z-9"), cfg(), None),
    ("no patient at stake: a patient on another source", ticket(patient=""),
     user(fhir_user=f"{SRC2}/Patient/z-9"), cfg(), "patient"),
    ("no patient at stake: not a patient", ticket(patient=""), user(fhir_user=f"{SRC}/Practitioner/p-1"), cfg(),
     "patient"),
    ("no patient at stake: not a single Patient id", ticket(patient=""),
     user(fhir_user=f"{SRC}/Patient/z-9/_history/1"), cfg(), "patient"),
    ("no patient, no source: a patient on any of the issuer's sources", ticket(source="", patient=""),
     user(fhir_user=f"{SRC2}/Patient/z-9"), cfg(), None),
    ("no patient, no source: not on the issuer's sources", ticket(source="", patient=""),
     user(fhir_user="https://elsewhere.example/fhir/Patient/z-9"), cfg(), "patient"),
]


@pytest.mark.parametrize("rule, row, signed_in, config, expected", rows(CHECK_SIGNER))
def test_check_signer(rule, row, signed_in, config, expected):
    try:
        check_signer(row, signed_in, config)
        got = None
    except WrongSigner as e:
        got = e.who
    assert got == expected


# -- consent_record: a consent for the chosen days, or a denial withdrawn at once --
@pytest.mark.parametrize("rule, granted, days, expected_days, decision", rows([
    ("an approval lasts the chosen days", True, 7, 7, "granted"),
    ("a denial expires and is withdrawn at once", False, 90, 0, "denied"),
]))
def test_consent_record(rule, granted, days, expected_days, decision):
    r = consent_record(ticket(), f"{SRC}/Patient/a-1", granted, days)
    assert len(r["id"]) == 32 and r["decision"] == decision
    assert r["expires"] - r["granted"] == timedelta(days=expected_days)
    assert r["withdrawn"] == (None if granted else r["granted"])
    assert {k: r[k] for k in ("issuer", "sub", "signer", "source", "patient", "client_id", "target_id", "scopes")} == {
        "issuer": EHR, "sub": "user-1", "signer": f"{SRC}/Patient/a-1", "source": SRC, "patient": "a-1",
        "client_id": "app", "target_id": 7, "scopes": "patient/Observation.rs"}
