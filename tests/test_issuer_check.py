"""`token-exchange issuer check` (contract "Admin CLI"): an EHR's discovery, keys and
sample tokens against what the service needs, a plain sentence for each problem;
exit 0 when nothing fails, 1 otherwise; nothing written."""
from __future__ import annotations

import json

import pytest

from fakes import SOURCE, UPSTREAM


def check(cli, ehr, tmp_path, at=None, idt=None, issuer=None):
    args = ["issuer", "check", issuer or ehr.issuer, "--json"]
    if at is not None:
        (tmp_path / "at").write_text(at)
        args += ["--access-token", str(tmp_path / "at")]
    if idt is not None:
        (tmp_path / "idt").write_text(idt)
        args += ["--id-token", str(tmp_path / "idt")]
    r = cli(*args, check=False)
    return r.exit_code, json.loads(r.stdout)


def outcomes(report):
    return {c["check"]: (c["outcome"], c["detail"]) for c in report["checks"]}


def test_a_registered_ehr_with_good_sample_tokens_passes(world, ehr, tmp_path):
    code, report = check(world, ehr, tmp_path, ehr.access_token(), ehr.id_token())
    assert code == 0 and report["ok"] and report["registered"], report
    got = outcomes(report)
    assert got["discovery"][0] == "ok" and got["jwks"][0] == "ok" and "RSA" in got["jwks"][1]
    assert got["access token signature"][0] == "ok" and got["ID token signature"][0] == "ok"
    assert got["ID token patient"] == ("ok", "a-123") and got["ID token source"] == ("ok", SOURCE)


@pytest.mark.parametrize("token_kw, failing, words", [
    ({"aud": "https://other.example/fhir"}, "access token aud", "registered sources"),
    ({"client": None}, "access token client_id", "upstream client"),
    ({"scope": "openid fhirUser"}, "access token scope", "no SMART resource scopes"),
    ({"iss": "https://impostor.example"}, "access token iss", "exactly"),
    ({"nonce": "n1"}, "access token shape", "looks like an ID token"),
])
def test_each_problem_in_a_sample_access_token_fails_with_a_sentence(world, ehr, tmp_path, token_kw, failing, words):
    code, report = check(world, ehr, tmp_path, at=ehr.sign(ehr.access_claims(**token_kw)))
    assert code == 1 and not report["ok"]
    outcome, detail = outcomes(report)[failing]
    assert outcome == "fail" and words in detail


def test_a_token_signed_by_an_unpublished_key_fails_its_signature_check(world, ehr, tmp_path):
    from fakes import new_key
    code, report = check(world, ehr, tmp_path, at=ehr.sign(ehr.access_claims(), key=new_key()))
    assert code == 1 and outcomes(report)["access token signature"][0] == "fail"


def test_an_unregistered_issuer_is_checked_against_the_defaults(cli, ehr, tmp_path):
    code, report = check(cli, ehr, tmp_path, idt=ehr.id_token())
    assert code == 0 and not report["registered"]
    assert outcomes(report)["registration"][0] == "note"


def test_a_pairwise_looking_sub_is_noted(world, ehr, tmp_path):
    code, report = check(world, ehr, tmp_path, idt=ehr.id_token(sub="Zk3q9T0xY7bL2mN8pQ4rS6uV1wX5yA0c"))
    assert code == 0 and outcomes(report)["ID token sub"][0] == "note"
    assert "pairwise" in outcomes(report)["ID token sub"][1]


def test_an_unreachable_ehr_fails(world, ehr, tmp_path):
    ehr.down = True
    code, report = check(world, ehr, tmp_path)
    assert code == 1 and outcomes(report)["jwks"][0] == "fail"


def test_the_text_report_ends_with_the_verdict(world, ehr, tmp_path):
    (tmp_path / "at").write_text(ehr.access_token())
    r = world("issuer", "check", ehr.issuer, "--access-token", str(tmp_path / "at"), check=False)
    assert r.exit_code == 0 and r.stdout.splitlines()[-1] == "the service can use this issuer"
    assert ehr.access_token()[:20] not in r.stdout


@pytest.mark.parametrize("endpoint", ["http://[::1/authorize", "http://127.0.0.1:1;frame-ancestors */authorize"])
def test_a_discovered_authorization_endpoint_that_is_not_a_valid_url_fails_and_says_sign_in_is_off(
        world, ehr, tmp_path, endpoint):
    from fakes import Scripted
    ehr.replies[".well-known/openid-configuration"] = Scripted(
        body=json.dumps(dict(ehr.discovery(), authorization_endpoint=endpoint)).encode())
    try:
        code, report = check(world, ehr, tmp_path)
    finally:
        ehr.reset_hostile()  # the session's EHR: later tests need its real discovery
    outcome, detail = outcomes(report)["authorization_endpoint"]
    assert code == 1 and outcome == "fail" and "sign-in" in detail and "--authorization-endpoint" in detail


@pytest.mark.parametrize("field, value", [("jwks_uri", True), ("jwks_uri", ["http://x.example/jwks"]),
                                          ("subject_types_supported", 5), ("subject_types_supported", True),
                                          ("id_token_signing_alg_values_supported", 5),
                                          ("id_token_signing_alg_values_supported", [["RS256"], {"a": 1}])])
def test_a_discovery_field_of_the_wrong_json_type_is_a_finding_not_a_crash(cli, ehr, tmp_path, field, value):
    """Found by tests/test_fuzz.py: a jwks_uri that is not a string crashed `issuer check`
    and `issuer add --discover`; a list field that is not a list of strings crashed `issuer check`."""
    from fakes import Scripted
    ehr.replies[".well-known/openid-configuration"] = Scripted(body=json.dumps(dict(ehr.discovery(),
                                                                                 **{field: value})).encode())
    try:
        code, report = check(cli, ehr, tmp_path)  # the in-process CLI raises on a crash
        assert code in (0, 1) and report["checks"]
        if field == "jwks_uri":
            assert code == 1 and "jwks_uri" in outcomes(report)["discovery"][1]
            r = cli("issuer", "add", ehr.issuer, "--discover", "--source", SOURCE, check=False)
            assert r.exit_code == 1 and r.stderr.startswith("error: ") and "jwks_uri" in r.stderr
    finally:
        ehr.reset_hostile()


# -- advice the CLI accepts; an ID token's aud against the trusts (issue 25, item 9) -------------------
def advised_commands(report):
    """Every `token-exchange ...` command a check's detail advises, as argv lists."""
    import re
    import shlex
    found = []
    for c in report["checks"]:
        for cmd in re.findall(r"`([^`]+)`", c["detail"]):
            argv = shlex.split(cmd)
            if argv and argv[0] == "token-exchange":
                found.append(argv[1:])
    return found


def test_issuer_check_never_advises_an_audience_the_cli_would_refuse(world, ehr, tmp_path):
    from conftest import SERVICE
    code, report = check(world, ehr, tmp_path, at=ehr.sign(ehr.access_claims(aud=SERVICE + "/token")))
    outcome, detail = outcomes(report)["access token aud"]
    assert code == 1 and outcome == "fail" and "this service" in detail
    assert "--audience" not in detail and advised_commands(report) == []


def test_issuer_check_advises_a_command_the_cli_accepts_and_that_keeps_the_sources(world, ehr, tmp_path):
    at = ehr.sign(ehr.access_claims(aud="https://api.a.example/fhir"))
    code, report = check(world, ehr, tmp_path, at=at)
    assert code == 1 and outcomes(report)["access token aud"][0] == "fail"
    (argv,) = advised_commands(report)
    assert argv[:3] == ["issuer", "update", ehr.issuer]
    assert world(*argv, check=False).exit_code == 0
    code, report = check(world, ehr, tmp_path, at=at)
    assert code == 0 and outcomes(report)["access token aud"][0] == "ok"
    assert json.loads(world("issuer", "show", ehr.issuer, "--json").stdout)["sources"] == [SOURCE]


def test_issuer_check_marks_an_id_token_ok_only_when_its_aud_names_a_trusts_upstream_client(world, ehr, tmp_path):
    code, report = check(world, ehr, tmp_path, idt=ehr.id_token(client="someone-else"))
    outcome, detail = outcomes(report)["ID token aud"]
    assert code == 1 and outcome == "fail" and "someone-else" in detail and UPSTREAM in detail
    assert "--upstream-client-id" in detail
    code, report = check(world, ehr, tmp_path, idt=ehr.id_token())
    assert code == 0 and outcomes(report)["ID token aud"] == ("ok", UPSTREAM)


def test_issuer_check_of_an_id_token_without_any_trust_for_the_issuer_notes_it_is_unchecked(cli, ehr, tmp_path):
    code, report = check(cli, ehr, tmp_path, idt=ehr.id_token())
    outcome, detail = outcomes(report)["ID token aud"]
    assert code == 0 and outcome == "note" and "no trust" in detail, report
