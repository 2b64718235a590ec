"""`token-exchange explain` (contract "Admin CLI"): every rule of a token request,
run by the same code as POST /token, printed rule by rule with the decision; it
writes nothing, searches nothing and spends nothing; exit 0 granted, 1 refused,
2 for usage errors."""
from __future__ import annotations

import json

import pytest

from conftest import audit_rows
from fakes import SOURCE, TARGET, UPSTREAM

STEP_NAMES = ["client", "grant type", "parameters", "target", "client has a trust", "tokens (rules 1, 2, 4)",
              "trust for issuer and target (rule 5)", "grant allowed by the trust", "upstream client (rule 3)",
              "scopes (rule 6)", "consent", "patient (rule 7)", "user"]


def explain(cli, tmp_path, *args, subject=None, actor=None, check=False):
    argv = ["explain", "--client", "vendor"]
    if subject is not None:
        (tmp_path / "at.jwt").write_text(subject)
        argv += ["--subject-token", str(tmp_path / "at.jwt")]
    if actor is not None:
        (tmp_path / "id.jwt").write_text(actor)
        argv += ["--actor-token", str(tmp_path / "id.jwt")]
    return cli(*argv, *args, check=check)


def as_report(result):
    return json.loads(result.stdout)


def test_explain_of_a_grantable_request_holds_every_rule_and_matches_the_token_endpoint(world, ehr, tmp_path,
                                                                                        exchange):
    at, idt = ehr.access_token(), ehr.id_token()
    r = explain(world, tmp_path, "--resource", TARGET, "--scope", "patient/Observation.rs", "--json",
                subject=at, actor=idt)
    assert r.exit_code == 0, r.output
    report = as_report(r)
    assert [s["step"] for s in report["steps"]] == STEP_NAMES
    assert all(s["outcome"] == "held" for s in report["steps"])
    real = exchange(subject_token=at, actor_token=idt).get_json()
    d = report["decision"]
    assert d["outcome"] == "granted" and d["scope"] == real["scope"] and d["patient"] == real["patient"] == "b-456"
    assert d["expires_in"] <= 300


def test_explain_names_the_failing_rule_with_the_error_the_service_would_give(world, ehr, tmp_path, exchange):
    at = ehr.access_token(client="another-app")
    r = explain(world, tmp_path, "--resource", TARGET, "--json", subject=at, actor=ehr.id_token())
    assert r.exit_code == 1
    report = as_report(r)
    outcome = {s["step"]: s for s in report["steps"]}
    failed = outcome["upstream client (rule 3)"]
    assert failed["outcome"] == "failed" and failed["error"] == "invalid_request"
    assert "another-app" in failed["reason"]  # the internal reason: which client it was issued to
    assert all(outcome[n]["outcome"] == "not checked" for n in ("scopes (rule 6)", "consent", "patient (rule 7)"))
    assert report["decision"]["error"] == exchange(subject_token=at).get_json()["error"] == "invalid_request"


def test_explain_text_output_marks_each_rule_and_ends_with_the_decision(world, ehr, tmp_path):
    r = explain(world, tmp_path, "--audience", "hospital-b", "--scope", "patient/Observation.c",
                subject=ehr.access_token(), actor=ehr.id_token())
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ok   client") and any(ln.startswith("FAIL scopes (rule 6)") for ln in lines)
    assert lines[-1].startswith("decision: refused with 400 invalid_scope")


def test_explain_writes_nothing(world, ehr, tmp_path):
    before = world("audit", "list", "--admin", "--json").stdout
    explain(world, tmp_path, "--resource", TARGET, subject=ehr.access_token(), actor=ehr.id_token())
    explain(world, tmp_path, "--resource", "https://nowhere.example/fhir", subject=ehr.access_token())
    assert audit_rows(world) == []
    assert world("audit", "list", "--admin", "--json").stdout == before


def test_explain_without_a_patient_link_says_patient_scopes_are_dropped(world, ehr, tmp_path):
    idt = ehr.id_token(patient="a-999")
    r = explain(world, tmp_path, "--resource", TARGET, "--scope", "patient/Observation.rs user/Patient.rs",
                "--json", subject=ehr.access_token(), actor=idt)
    report = as_report(r)
    step = {s["step"]: s for s in report["steps"]}["patient (rule 7)"]
    assert step["outcome"] == "held" and "dropped" in step["detail"]
    assert report["decision"]["scope"] == "user/Patient.rs" and "patient" not in report["decision"]


def test_explain_of_an_unknown_client_is_a_refusal_not_a_crash(world, ehr, tmp_path):
    (tmp_path / "t").write_text(ehr.access_token())
    r = world("explain", "--client", "ghost", "--subject-token", str(tmp_path / "t"), "--resource", TARGET,
              "--json", check=False)
    assert r.exit_code == 1 and as_report(r)["decision"]["error"] == "invalid_client"


def test_explain_of_a_disabled_client_is_the_refusal_the_token_endpoint_gives(world, ehr, tmp_path, exchange):
    world("client", "disable", "vendor")
    r = explain(world, tmp_path, "--resource", TARGET, "--json", subject=ehr.access_token(), actor=ehr.id_token())
    report = as_report(r)
    assert r.exit_code == 1 and report["steps"][0]["outcome"] == "failed" and "disabled" in report["steps"][0]["detail"]
    real = exchange()
    assert (report["decision"]["status"], report["decision"]["error"], report["decision"]["error_description"]) == (
        real.status_code, real.get_json()["error"], real.get_json()["error_description"])


def test_explain_reads_a_token_from_standard_input(world, ehr):
    r = world("explain", "--client", "vendor", "--subject-token", "-", "--resource", TARGET, "--scope",
              "user/Patient.rs", input=ehr.access_token() + "\n", check=False)
    assert r.exit_code == 0, r.output


def test_explain_usage_errors_exit_2(world, tmp_path):
    assert world("explain", "--client", "vendor", "--resource", TARGET, check=False).exit_code == 2
    (tmp_path / "t").write_text("x")
    r = world("explain", "--client", "vendor", "--subject-token", str(tmp_path / "t"), "--assertion",
              str(tmp_path / "t"), check=False)
    assert r.exit_code == 2 and r.stderr.startswith("error:")


def test_explain_never_prints_the_tokens(world, ehr, tmp_path):
    at, idt = ehr.access_token(), ehr.id_token()
    for args in (("--json",), ()):
        r = explain(world, tmp_path, "--resource", TARGET, *args, subject=at, actor=idt)
        assert at not in r.output and idt not in r.output
        assert at.split(".")[2] not in r.output
    assert SOURCE in explain(world, tmp_path, "--resource", TARGET, subject=at, actor=idt).stdout


# -- a dry run where matching would search (issue 25, item 1) --------------------------------------
SSN = "urn:oid:2.16.840.1.113883.4.1"


@pytest.fixture
def matching(world, ehr, fhir):
    """Issuer A vouches for SSN; target `matching-b` (the fake) matches on it."""
    world("issuer", "update", ehr.issuer, "--identifier-system", SSN)
    world("target", "add", fhir.base, "--name", "matching-b", "--match-identifier", SSN)
    world("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", fhir.base,
          "--scopes", "patient/*.rs user/*.rs", "--upstream-client-id", UPSTREAM)
    return world


def test_explain_never_claims_a_refusal_where_the_token_endpoint_would_match_by_identifier(
        matching, ehr, fhir, tmp_path, exchange):
    fhir.add("c-777", (SSN, "123-45-6789"))
    at, idt = ehr.access_token(), ehr.id_token(patient_identifier=[f"{SSN}|123-45-6789"])
    args = ("--resource", fhir.base, "--scope", "patient/Observation.rs")
    text = explain(matching, tmp_path, *args, subject=at, actor=idt)
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert not any(ln.startswith("FAIL") for ln in lines), text.output
    (patient,) = [ln for ln in lines if "patient (rule 7)" in ln]
    assert "would search the target for 1 identifier(s) of " + SSN in patient
    assert lines[-1].startswith("decision: granted if the search finds exactly one patient: patient/Observation.rs")
    assert "otherwise refused with 400 invalid_scope" in lines[-1]
    report = as_report(explain(matching, tmp_path, *args, "--json", subject=at, actor=idt))
    step = {s["step"]: s for s in report["steps"]}["patient (rule 7)"]
    d = report["decision"]
    assert step["outcome"] == "would search" and d["outcome"] == "granted if matched"
    assert d["scope"] == "patient/Observation.rs" and d["otherwise"]["error"] == "invalid_scope"
    assert fhir.searches == []  # explain searched nothing; POST /token then does, and grants
    real = exchange(subject_token=at, actor_token=idt, resource=fhir.base, scope="patient/Observation.rs")
    assert real.status_code == 200 and real.get_json()["patient"] == "c-777"


def test_explain_of_a_would_search_with_other_scopes_says_what_remains_without_a_match(
        matching, ehr, fhir, tmp_path):
    idt = ehr.id_token(patient_identifier=[f"{SSN}|1"])
    r = explain(matching, tmp_path, "--resource", fhir.base, "--scope",
                "patient/Observation.rs user/Observation.rs", "--json", subject=ehr.access_token(), actor=idt)
    d = as_report(r)["decision"]
    assert r.exit_code == 0 and d["outcome"] == "granted if matched"
    assert d["scope"] == "patient/Observation.rs user/Observation.rs"
    assert d["otherwise"] == {"outcome": "granted", "scope": "user/Observation.rs"}
