"""The user at the target (`target --users mapped`), against a real FHIR search
implementation: Medplum's FHIR router and in-memory repository (tests/fhir_server) as
the target, holding Practitioners with NPIs and verifying the service's self-minted
search token with the service's own /jwks over HTTP. The service runs on a loopback
HTTP server; exchanges, introspection and the CLI go through their real surfaces."""
from __future__ import annotations

import json

import jwt
import pytest
import requests

from conftest import AT, IDT, TE, TARGET_SECRET, VENDOR_SECRET, audit_rows
from fakes import SOURCE, UPSTREAM, free_port
from fhirserver import require_all, unavailable
from test_jwt_grant import JWT_BEARER, make_grant
# the served app and the Medplum target, as patient matching's tests set them up (fixtures)
from test_matching_medplum import medplum, patient, seed, servers, service  # noqa: F401

if unavailable() and not require_all():
    pytest.skip(unavailable(), allow_module_level=True)

NPI = "http://hl7.org/fhir/sid/us-npi"
OTHER = "urn:example:staff-id"
SSN = "urn:oid:2.16.840.1.113883.4.1"
DOCTOR = SOURCE + "/Practitioner/p1"  # the fake EHR's default fhirUser
USER_SCOPE = "user/Observation.rs"


@pytest.fixture
def users(world, ehr, medplum, service):
    """Issuer A vouches for NPIs (users) and SSNs (patients); the Medplum target maps users by NPI."""
    world("issuer", "update", ehr.issuer, "--user-identifier-system", NPI, "--identifier-system", SSN)
    world("target", "add", medplum.base, "--name", "medplum", "--users", "mapped", "--user-match-identifier", NPI,
          "--match-identifier", SSN, "--introspection-secret-env", "TARGET_SECRET")
    world("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", medplum.base,
          "--scopes", "patient/*.rs user/*.rs", "--upstream-client-id", UPSTREAM)
    return world


def practitioner(pid, *identifiers, **extra):
    return dict(patient(pid, *identifiers, **extra), resourceType="Practitioner")


def exchange(service, ehr, target, npis=None, scope=USER_SCOPE, **id_extra):
    if npis is not None:
        id_extra["fhirUser_identifier"] = npis
    return requests.post(service.url + "/token", auth=("vendor", VENDOR_SECRET), timeout=30, data={
        "grant_type": TE, "subject_token": ehr.access_token(), "subject_token_type": AT,
        "actor_token": ehr.id_token(**id_extra), "actor_token_type": IDT, "resource": target, "scope": scope})


def claims(r):
    return jwt.decode(r.json()["access_token"], options={"verify_signature": False})


def user_searches(medplum):
    return [r for r in medplum.requests() if r["path"].startswith("/fhir/Practitioner?")]


def last(world):
    return audit_rows(world)[-1]


def rows(world, *args):
    return json.loads(world("user-link", "list", "--json", *args).output)


def introspect(service, token):
    return requests.post(service.url + "/introspect", data={"token": token}, auth=("medplum", TARGET_SECRET),
                         timeout=10).json()


# -- rule 3: exactly one -------------------------------------------------------------------------
def test_one_practitioner_with_the_npi_maps_the_user_and_the_token_names_only_the_target_s_url(
        users, medplum, service, ehr):
    seed(medplum, practitioner("pr-1", (NPI, "1234567893")), practitioner("decoy", (NPI, "999")))
    r = exchange(service, ehr, medplum.base, [{"system": NPI, "value": "1234567893"}])
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == USER_SCOPE
    c = claims(r)
    assert c["fhirUser"] == medplum.base + "/Practitioner/pr-1"
    assert SOURCE not in json.dumps(c)  # A's URL for the user never reaches B
    (s,) = user_searches(medplum)
    assert s["status"] == 200 and s["auth_error"] is None
    assert s["claims"]["scope"] == "system/Practitioner.rs" and s["claims"]["aud"] == medplum.base
    assert s["headers"]["prefer"] == "handling=strict"
    assert introspect(service, r.json()["access_token"])["fhirUser"] == medplum.base + "/Practitioner/pr-1"
    (row,) = rows(users)
    assert row == {"user": DOCTOR, "target": medplum.base, "target_user": "Practitioner/pr-1", "origin": "matched",
                   "system": NPI, "matched_at": row["matched_at"]} and row["matched_at"]
    rec = last(users)
    assert (rec["user_link"], rec["source_user"], rec["target_user"]) == ("matched", DOCTOR, "Practitioner/pr-1")
    again = exchange(service, ehr, medplum.base, [{"system": NPI, "value": "1234567893"}])
    assert claims(again)["fhirUser"] == medplum.base + "/Practitioner/pr-1"
    assert len(user_searches(medplum)) == 1 and last(users)["user_link"] == "matched-stored"


def test_two_practitioners_with_one_npi_are_ambiguous_refused_as_unknown_and_remembered(
        users, medplum, service, ehr):
    seed(medplum, practitioner("pr-1", (NPI, "dup")), practitioner("pr-2", (NPI, "dup")))
    r = exchange(service, ehr, medplum.base, [f"{NPI}|dup"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    assert "not known to the target" in r.json()["error_description"]
    assert last(users)["user_link"] == "ambiguous" and rows(users) == []
    r = exchange(service, ehr, medplum.base, [f"{NPI}|dup"])
    assert r.status_code == 400 and len(user_searches(medplum)) == 1  # the 10-minute memory
    assert last(users)["user_link"] == "ambiguous"


def test_an_inactive_practitioner_does_not_count(users, medplum, service, ehr):
    users("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", "medplum", "--target-patient", "t-9")
    seed(medplum, practitioner("pr-1", (NPI, "1"), active=False))
    r = exchange(service, ehr, medplum.base, [f"{NPI}|1"], scope=f"{USER_SCOPE} patient/Observation.rs")
    assert r.status_code == 200 and r.json()["scope"] == "patient/Observation.rs"  # patient scopes stand alone
    assert "fhirUser" not in claims(r) and last(users)["user_link"] == "none"


@pytest.mark.parametrize("replaced, mapped", [(False, "Patient/t-mum"), (True, None)])
def test_another_patient_as_the_user_is_searched_by_type_and_a_replaced_one_does_not_count(
        users, medplum, service, ehr, replaced, mapped):
    """A parent who is a patient too, signed in for their child: a Patient user who is not
    the exchange's patient is mapped like any user (a Patient search); FHIR's replaced-by
    link marks a Patient that no longer counts."""
    users("target", "update", "medplum", "--user-match-identifier", NPI, "--user-match-identifier", OTHER)
    users("issuer", "update", ehr.issuer, "--user-identifier-system", NPI, "--user-identifier-system", OTHER)
    extra = {"link": [{"type": "replaced-by", "other": {"reference": "Patient/t-new"}}]} if replaced else {}
    seed(medplum, patient("t-mum", (OTHER, "mum"), **extra))
    r = exchange(service, ehr, medplum.base, [f"{OTHER}|mum"], fhirUser=SOURCE + "/Patient/a-mum")
    searched = [q["path"] for q in medplum.requests()]
    assert len(searched) == 1 and searched[0].startswith("/fhir/Patient?identifier=")
    if mapped:
        assert r.status_code == 200 and claims(r)["fhirUser"] == f"{medplum.base}/{mapped}"
    else:
        assert r.status_code == 400 and last(users)["user_link"] == "none"


def test_an_identifier_of_a_system_the_target_does_not_list_searches_nothing(users, medplum, service, ehr):
    users("issuer", "update", ehr.issuer, "--user-identifier-system", NPI, "--user-identifier-system", OTHER)
    seed(medplum, practitioner("pr-1", (OTHER, "1")))
    r = exchange(service, ehr, medplum.base, [f"{OTHER}|1"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    assert user_searches(medplum) == [] and last(users)["user_link"] == "none"


def test_a_patient_user_who_is_the_exchange_s_patient_maps_through_the_patient_link(users, medplum, service, ehr):
    users("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", "medplum", "--target-patient", "t-9")
    r = exchange(service, ehr, medplum.base, scope=USER_SCOPE, fhirUser=SOURCE + "/Patient/a-123")
    assert r.status_code == 200, r.text
    assert claims(r)["fhirUser"] == medplum.base + "/Patient/t-9"
    assert medplum.requests() == [] and last(users)["user_link"] == "patient"


def test_the_target_down_is_503_with_retry_after(users, ehr, service):
    down = f"http://127.0.0.1:{free_port()}/fhir"
    users("target", "add", down, "--users", "mapped", "--user-match-identifier", NPI)
    users("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", down,
          "--scopes", "user/*.rs", "--upstream-client-id", UPSTREAM)
    r = exchange(service, ehr, down, [f"{NPI}|1"])
    assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable"
    assert r.headers["Retry-After"] == "30" and VENDOR_SECRET not in r.text
    assert last(users)["user_link"] == "unavailable" and rows(users) == []


def test_the_user_s_own_resource_is_read_at_a_medplum_ehr_when_the_token_carries_no_identifier(
        users, medplum, service, ehr, fhir_server_factory):
    ehr_fhir = fhir_server_factory(jwks_url=ehr.issuer + "/jwks", issuer=ehr.issuer)
    b = ehr.backend
    b.reset()
    try:
        b.client_id, b.audience = "te-at-ehr", ehr_fhir.base
        b.client_jwks = lambda: requests.get(service.url + "/jwks", timeout=10).json()
        users("issuer", "update", ehr.issuer, "--source", SOURCE, "--source", ehr_fhir.base,
              "--fhir-client-id", "te-at-ehr", "--token-endpoint", b.token_endpoint)
        ehr_fhir.seed(practitioner("doc-7", (NPI, "777"), ("urn:example:badge", "b-7")))
        seed(medplum, practitioner("t-doc", (NPI, "777")))
        r = exchange(service, ehr, medplum.base, None, patient=None, source=ehr_fhir.base,
                     fhirUser=ehr_fhir.base + "/Practitioner/doc-7")
        assert r.status_code == 200, r.text
        assert claims(r)["fhirUser"] == medplum.base + "/Practitioner/t-doc"
        (read,) = ehr_fhir.requests()
        assert read["path"] == "/fhir/Practitioner/doc-7" and read["status"] == 200
        assert read["claims"]["scope"] == "system/Practitioner.rs" and b.token_requests[0]["scope"] == \
            "system/Practitioner.rs"
        assert rows(users)[0]["user"] == ehr_fhir.base + "/Practitioner/doc-7"
    finally:
        b.reset()


# -- rule 1 and the CLI ----------------------------------------------------------------------------
def test_a_table_link_serves_at_once_and_user_link_remove_revokes_its_tokens(users, medplum, service, ehr):
    users("user-link", "add", "--user", DOCTOR, "--target", "medplum", "--target-user", "Practitioner/789")
    r = exchange(service, ehr, medplum.base)
    assert r.status_code == 200 and claims(r)["fhirUser"] == medplum.base + "/Practitioner/789"
    assert medplum.requests() == [] and last(users)["user_link"] == "table"
    token = r.json()["access_token"]
    assert introspect(service, token)["active"] is True
    assert users("user-link", "remove", "--user", DOCTOR, "--target", "medplum").output == "user link removed\n"
    assert introspect(service, token) == {"active": False}
    assert rows(users) == []


def test_a_table_user_link_is_read_once_per_generation_and_its_removal_seen_at_once(users, medplum, service, ehr):
    """The warm path asks the database nothing a warm cache knows (a mapped user costs no
    read once its table link was read under this configuration generation), and an admin
    change moves the generation: the next exchange sees the removal."""
    users("user-link", "add", "--user", DOCTOR, "--target", "medplum", "--target-user", "Practitioner/789")
    hot = service.app.extensions["token_exchange"].store._hot
    reads, run = [], hot.run

    def counted(statement, params, **kw):
        reads.append(statement is hot.find_user_link)
        return run(statement, params, **kw)
    hot.run = counted
    try:
        for _ in range(3):
            assert claims(exchange(service, ehr, medplum.base))["fhirUser"] == medplum.base + "/Practitioner/789"
        assert sum(reads) == 1
        users("user-link", "remove", "--user", DOCTOR, "--target", "medplum")
        r = exchange(service, ehr, medplum.base)
        assert r.status_code == 400 and "not known to the target" in r.json()["error_description"]
    finally:
        hot.run = run


def test_block_is_an_admins_answer_to_a_wrong_match(users, medplum, service, ehr):
    seed(medplum, practitioner("wrong", (NPI, "5")))
    assert claims(exchange(service, ehr, medplum.base, [f"{NPI}|5"]))["fhirUser"].endswith("/Practitioner/wrong")
    first = exchange(service, ehr, medplum.base, [f"{NPI}|5"]).json()["access_token"]
    users("user-link", "block", "--user", DOCTOR, "--target", medplum.base)
    assert introspect(service, first) == {"active": False}  # the wrong match's tokens are revoked
    r = exchange(service, ehr, medplum.base, [f"{NPI}|5"])
    assert r.status_code == 400 and "not known to the target" in r.json()["error_description"]
    assert last(users)["user_link"] == "blocked"
    (row,) = rows(users, "--origin", "blocked")
    assert row["target_user"] is None and row["origin"] == "blocked"


def test_user_link_match_import_export_through_the_cli(users, medplum, service, tmp_path):
    seed(medplum, practitioner("pr-1", (NPI, "42")))
    dry = json.loads(users("user-link", "match", "--user", DOCTOR, "--target", "medplum", "--identifier",
                           f"{NPI}|42", "--dry-run", "--json").output)
    assert dry["decision"] == "matched" and dry["target_user"] == "Practitioner/pr-1" and dry["stored"] is False
    assert rows(users) == []
    done = json.loads(users("user-link", "match", "--user", DOCTOR, "--target", "medplum", "--identifier",
                            f"{NPI}|42", "--json").output)
    assert done["decision"] == "matched" and done["stored"] is True and done["system"] == NPI
    assert rows(users, "--origin", "matched")[0]["target_user"] == "Practitioner/pr-1"
    bad = users("user-link", "match", "--user", DOCTOR, "--target", "medplum", "--identifier", f"{OTHER}|1",
                check=False)
    assert bad.exit_code == 1 and bad.stderr.startswith("error: ")
    csv_in = tmp_path / "users.csv"
    csv_in.write_text(f"user,target,target_user\n{DOCTOR},medplum,Practitioner/777\n"
                      f"{SOURCE}/RelatedPerson/r1,{medplum.base},RelatedPerson/rp-2\n")
    out = users("user-link", "import", str(csv_in)).output
    assert out == "imported 2 user links (1 replaced matched links)\n"
    assert users("user-link", "import", str(csv_in), check=False).exit_code == 1  # already stored: all or nothing
    exported = users("user-link", "export").output.splitlines()
    assert exported == ["user,target,target_user", f"{DOCTOR},{medplum.base},Practitioner/777",
                        f"{SOURCE}/RelatedPerson/r1,{medplum.base},RelatedPerson/rp-2"]
    listed = rows(users, "--target", "medplum", "--origin", "table")
    assert [r["target_user"] for r in listed] == ["Practitioner/777", "RelatedPerson/rp-2"]
    assert set(listed[0]) == {"user", "target", "target_user", "origin", "system", "matched_at"}
    for args in (["--user", "not a url"], ["--user", SOURCE + "/Observation/1"]):
        r = users("user-link", "add", *args, "--target", "medplum", "--target-user", "Practitioner/1", check=False)
        assert r.exit_code == 1 and r.stderr.startswith("error: --user")
    r = users("user-link", "add", "--user", DOCTOR, "--target", "medplum", "--target-user", "x", check=False)
    assert r.exit_code == 1 and "--target-user" in r.stderr


def test_token_revoke_user_covers_tokens_minted_at_a_mapped_target(users, medplum, service, ehr):
    users("user-link", "add", "--user", DOCTOR, "--target", "medplum", "--target-user", "Practitioner/789")
    token = exchange(service, ehr, medplum.base).json()["access_token"]
    out = users("token", "revoke", "--user", DOCTOR).output
    assert "covers 1 audited grant(s)" in out
    assert introspect(service, token) == {"active": False}


# -- both grants; explain agrees; the record -------------------------------------------------------
def test_the_jwt_grant_maps_the_user_the_same_way(users, medplum, service, ehr):
    users("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", medplum.base,
          "--allow-jwt-grant")
    seed(medplum, practitioner("pr-1", (NPI, "11")))
    assertion = make_grant(ehr, scope="user/*.rs", fhirUser_identifier=[f"{NPI}|11"])
    r = requests.post(service.url + "/token", auth=("vendor", VENDOR_SECRET), timeout=30, data={
        "grant_type": JWT_BEARER, "assertion": assertion, "resource": medplum.base, "scope": USER_SCOPE})
    assert r.status_code == 200, r.text
    assert claims(r)["fhirUser"] == medplum.base + "/Practitioner/pr-1"
    assert last(users)["grant"] == "jwt-bearer" and last(users)["user_link"] == "matched"


def test_explain_shows_the_user_step_and_agrees_with_the_token_endpoint(users, medplum, service, ehr, tmp_path):
    from test_explain import as_report, explain
    seed(medplum, practitioner("pr-1", (NPI, "3")))
    at, idt = ehr.access_token(), ehr.id_token(fhirUser_identifier=[f"{NPI}|3"])
    args = ("--resource", medplum.base, "--scope", USER_SCOPE, "--json")
    report = as_report(explain(users, tmp_path, *args, subject=at, actor=idt))
    step = {s["step"]: s for s in report["steps"]}["user"]
    assert step["outcome"] == "would search" and "Practitioner" in step["detail"]
    assert report["decision"]["outcome"] == "granted if matched" and report["decision"]["searches"] == ["user"]
    assert report["decision"]["otherwise"]["error"] == "invalid_scope"
    assert medplum.requests() == []  # explain searched nothing
    r = exchange(service, ehr, medplum.base, [f"{NPI}|3"])
    assert r.status_code == 200
    report = as_report(explain(users, tmp_path, *args, subject=at, actor=idt))
    assert report["decision"]["outcome"] == "granted"
    assert report["decision"]["fhirUser"] == claims(r)["fhirUser"]
    users("user-link", "block", "--user", DOCTOR, "--target", "medplum")
    refused = explain(users, tmp_path, *args, subject=at, actor=idt)
    assert refused.exit_code == 1 and as_report(refused)["decision"]["error"] == "invalid_scope"
    assert exchange(service, ehr, medplum.base, [f"{NPI}|3"]).json()["error"] == "invalid_scope"


def test_the_audit_export_and_metrics_name_both_users(users, medplum, service, ehr):
    users("user-link", "add", "--user", DOCTOR, "--target", "medplum", "--target-user", "Practitioner/789")
    assert exchange(service, ehr, medplum.base).status_code == 200
    bundle = json.loads(users("audit", "export", "--format", "fhir").output)
    ev = bundle["entry"][-1]["resource"]
    refs = [e["what"].get("reference") for e in ev["entity"]]
    assert DOCTOR in refs and medplum.base + "/Practitioner/789" in refs
    metrics = requests.get(service.url + "/metrics", timeout=10).text
    assert 'token_exchange_user_mappings_total{outcome="table"} 1.0' in metrics


def test_an_unusable_fhir_user_is_no_user_never_a_500(users, medplum, service, ehr):
    users("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", "medplum", "--target-patient", "t-9")
    for bad in (42, "Practitioner/../x", "https://elsewhere.example/Practitioner/1", SOURCE + "/Observation/1",
                DOCTOR + "/_history/2", "x" * 5000):
        r = exchange(service, ehr, medplum.base, scope=f"{USER_SCOPE} patient/Observation.rs", fhirUser=bad)
        assert r.status_code in (200, 400), r.text
        assert r.json().get("scope", "patient/Observation.rs") == "patient/Observation.rs"
        if r.status_code == 200:
            assert "fhirUser" not in claims(r)


def test_an_as_is_target_passes_fhir_user_on_and_records_the_source_user(users, service, ehr):
    from fakes import TARGET
    r = exchange(service, ehr, TARGET, scope=USER_SCOPE)
    assert r.status_code == 200 and claims(r)["fhirUser"] == DOCTOR
    rec = last(users)
    assert rec["user_link"] is None and rec["source_user"] == DOCTOR and rec["target_user"] is None


def test_target_and_issuer_show_and_config_export_carry_the_user_options(users, medplum, ehr, tmp_path):
    shown = json.loads(users("target", "show", "medplum", "--json").output)
    assert shown["users"] == "mapped" and shown["user_match_identifiers"] == [NPI]
    issuer = json.loads(users("issuer", "show", ehr.issuer, "--json").output)
    assert issuer["user_identifier_systems"] == [NPI] and issuer["user_identifier_claim"] == "fhirUser_identifier"
    doc = json.loads(users("config", "export").output)
    (t,) = [t for t in doc["targets"] if t["base_url"] == medplum.base]
    assert t["users"] == "mapped" and t["user_match_identifiers"] == [NPI]
    t["users"] = "as-is"
    (i,) = doc["issuers"]
    i["user_identifier_claim"] = "npi_ids"
    (tmp_path / "c.json").write_text(json.dumps(doc))
    from conftest import CLI
    from test_config import secret_variables
    medplum_target = dict(t)
    doc["targets"].remove(t)
    env = secret_variables(doc)
    env[medplum_target["introspection_secret_env"]] = TARGET_SECRET
    apply = CLI(dict(users.env, **env))
    out = apply("config", "apply", str(tmp_path / "c.json")).output
    assert "users" in out and "user_identifier_claim" in out
    assert json.loads(users("target", "show", "medplum", "--json").output)["users"] == "as-is"
    assert apply("config", "apply", str(tmp_path / "c.json")).output.strip() == "no changes"


def test_user_link_failures_are_one_error_line_and_change_nothing(world, tmp_path):
    from fakes import TARGET
    r = world("user-link", "remove", "--user", DOCTOR, "--target", "hospital-b", check=False)
    assert r.exit_code == 1 and r.stderr == "error: no such user link\n"
    r = world("user-link", "add", "--user", DOCTOR, "--target", "nowhere", "--target-user", "Practitioner/1",
              check=False)
    assert r.exit_code == 1 and r.stderr.startswith("error: no target")
    world("user-link", "add", "--user", DOCTOR, "--target", "hospital-b", "--target-user", "Practitioner/1")
    r = world("user-link", "add", "--user", DOCTOR, "--target", TARGET, "--target-user", "Practitioner/2",
              check=False)
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = world("user-link", "import", "-", input="user,target\n", check=False)
    assert r.exit_code == 1 and "first line must be user,target,target_user" in r.stderr
    r = world("user-link", "import", "-", input=f"user,target,target_user\n{SOURCE}/Practitioner/p9,hospital-b,"
                                                  "Practitioner/9\n=cmd,hospital-b,Practitioner/1\n", check=False)
    assert r.exit_code == 1 and r.stderr.startswith("error: <stdin>:3: user") and len(rows(world)) == 1
    r = world("target", "remove", "hospital-b", check=False)
    assert r.exit_code == 1 and "1 user link(s)" in r.stderr
    world("target", "remove", "hospital-b", "--yes")
    assert rows(world) == []


def test_practitioner_role_users_are_mapped_from_the_table_only(users, medplum, service, ehr):
    role = SOURCE + "/PractitionerRole/r-1"
    seed(medplum, practitioner("pr-1", (NPI, "8")))
    r = exchange(service, ehr, medplum.base, [f"{NPI}|8"], fhirUser=role)
    assert r.status_code == 400 and "not known to the target" in r.json()["error_description"]
    assert medplum.requests() == [] and last(users)["user_link"] == "none"
    users("user-link", "add", "--user", role, "--target", "medplum", "--target-user", "PractitionerRole/b-r1")
    r = exchange(service, ehr, medplum.base, [f"{NPI}|8"], fhirUser=role)
    assert r.status_code == 200 and claims(r)["fhirUser"] == medplum.base + "/PractitionerRole/b-r1"


def test_the_ehr_failing_the_backend_services_token_is_503_and_stores_nothing(users, medplum, service, ehr):
    b = ehr.backend
    b.reset()
    try:
        b.client_id, b.token_fault = "te-at-ehr", 500
        users("issuer", "update", ehr.issuer, "--fhir-client-id", "te-at-ehr", "--token-endpoint", b.token_endpoint)
        r = exchange(service, ehr, medplum.base)  # no identifier in the token: the user's resource is read
        assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable"
        assert "EHR" in r.json()["error_description"] and r.headers["Retry-After"] == "30"
        assert last(users)["user_link"] == "unavailable" and rows(users) == [] and medplum.requests() == []
    finally:
        b.reset()
