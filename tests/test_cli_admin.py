"""Editing in place and safe removals (contract "Admin CLI": `update` on every noun,
removals that delete other records only with --yes, targets by name), clear
failures (secrets given by mistake, databases without schema), and CLI output
that never writes control characters raw; patient links of every origin."""
from __future__ import annotations

import json
import sqlite3

import pytest

from conftest import CLI, base_env
from fakes import SOURCE, TARGET, TARGET2, UPSTREAM
from test_cli import LINK_HEADER, Refusals, as_json, refused, write_csv

ESC = "\x1b[31m"


# -- update --------------------------------------------------------------------------
def test_issuer_update_changes_only_the_options_given(world, ehr, env):
    before = as_json(world, "issuer", "show", ehr.issuer)
    env["NEW_EHR_SECRET"] = "n" * 40
    world("issuer", "update", ehr.issuer, "--source", SOURCE, "--source", SOURCE + "-2",
          "--identifier-system", "urn:oid:2.16.840.1.113883.4.1", "--introspection-secret-env", "NEW_EHR_SECRET")
    after = as_json(world, "issuer", "show", ehr.issuer)
    assert after["sources"] == [SOURCE, SOURCE + "-2"]  # a repeatable option replaces the whole list
    assert after["identifier_systems"] == ["urn:oid:2.16.840.1.113883.4.1"]
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {"sources", "identifier_systems"}  # the secret changed too, but shows only as "set"
    assert "n" * 40 not in json.dumps(as_json(world, "audit", "list", "--admin"))
    assert as_json(world, "audit", "list", "--admin")[-1]["action"] == "issuer.update"


def test_issuer_update_clears_a_list_with_an_empty_value_and_refuses_an_empty_source_list(world, ehr):
    world("issuer", "update", ehr.issuer, "--audience", "https://api.a.example")
    assert as_json(world, "issuer", "show", ehr.issuer)["audiences"] == ["https://api.a.example"]
    world("issuer", "update", ehr.issuer, "--audience", "")
    assert as_json(world, "issuer", "show", ehr.issuer)["audiences"] == []
    refused(world, "issuer", "update", ehr.issuer, "--source", "", mentions="--source")


def test_issuer_update_without_options_or_of_an_unknown_issuer_is_refused(world, ehr):
    refused(world, "issuer", "update", ehr.issuer, mentions="nothing to change")
    refused(world, "issuer", "update", "https://ghost.example/as", "--algs", "RS256", mentions="no issuer")


def test_issuer_audience_naming_this_service_is_refused(world, ehr):
    for aud in ("http://te.test", "http://te.test/token", "http://te.test/anything/below"):
        refused(world, "issuer", "update", ehr.issuer, "--audience", aud, mentions="names this service")


def test_target_update_by_name_changes_ttl_and_keeps_its_links(world):
    world("target", "update", "hospital-b", "--max-ttl", "120", "--match-identifier", "urn:example:mrn",
          "--match-ttl", "7")
    shown = as_json(world, "target", "show", "hospital-b")
    assert shown["max_ttl"] == 120 and shown["match_identifiers"] == ["urn:example:mrn"]
    assert shown["match_ttl_days"] == 7 and shown["base_url"] == TARGET
    assert [lk["target_patient"] for lk in as_json(world, "link", "list", "--target", "hospital-b")] == ["b-456"]
    world("target", "update", TARGET, "--no-max-ttl")
    assert as_json(world, "target", "show", TARGET)["max_ttl"] is None


def test_target_update_refuses_a_name_another_target_has(world):
    refused(world, "target", "update", TARGET, "--name", "clinic-c", mentions="already exists")


def test_client_update_sets_name_and_exact_redirect_uris(world):
    world("client", "update", "vendor", "--name", "Acme Labs", "--redirect-uri", "https://app.acme.example/cb",
          "--redirect-uri", "http://127.0.0.1:9000/cb")
    shown = as_json(world, "client", "show", "vendor")
    assert shown["name"] == "Acme Labs"
    assert shown["redirect_uris"] == ["https://app.acme.example/cb", "http://127.0.0.1:9000/cb"]
    refuse = Refusals(world)
    for bad in ("http://app.acme.example/cb", "https://app.acme.example/cb#x", "app.acme.example/cb"):
        refuse("client", "update", "vendor", "--redirect-uri", bad, mentions="--redirect-uri")


def test_client_update_with_a_new_secret_replaces_the_old(world, env, exchange):
    env["NEWER_SECRET"] = "z" * 40
    world("client", "update", "vendor", "--secret-env", "NEWER_SECRET")
    from conftest import VENDOR_SECRET
    assert exchange(auth=("vendor", VENDOR_SECRET)).status_code == 401
    assert exchange(auth=("vendor", "z" * 40)).status_code == 200


def test_client_id_equal_to_an_issuer_or_this_service_is_refused(world, ehr):
    refused(world, "client", "add", ehr.issuer, "--generate-secret", mentions="issuer")
    refused(world, "client", "add", "http://te.test", "--generate-secret", mentions="this service")


def test_trust_update_by_target_name_changes_only_what_is_given(world, ehr, exchange):
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", "hospital-b",
          "--scopes", "patient/Condition.rs", "--allow-jwt-grant", "--consent", "required",
          "--consent-max-days", "30")
    (row,) = as_json(world, "trust", "list")
    assert row["scopes"] == "patient/Condition.rs" and row["upstream_client_id"] == UPSTREAM
    assert row["allow_jwt_grant"] is True and row["allow_id_token"] is False
    assert row["consent"] == "required" and row["consent_max_days"] == 30 and row["consent_signer"] == "patient"
    world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET,
          "--no-allow-jwt-grant", "--consent", "none")
    (row,) = as_json(world, "trust", "list")
    assert row["allow_jwt_grant"] is False and row["consent"] == "none"
    assert exchange(scope="patient/Observation.rs").get_json()["error"] == "invalid_scope"  # the new scopes hold


def test_trust_update_of_a_missing_trust_is_refused(world, ehr):
    refused(world, "trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET2,
            "--scopes", "patient/*.rs", mentions="no such trust")


# -- removals that delete other records -------------------------------------------------
def test_target_remove_names_what_it_would_delete_and_acts_only_with_yes(world):
    r = refused(world, "target", "remove", "hospital-b", mentions=("1 trust(s)", "1 patient link(s)", "--yes"))
    assert "b-456" not in r
    assert world("target", "remove", "hospital-b", "--yes").stdout.startswith(f"target {TARGET} removed")
    assert as_json(world, "link", "list") == [] and as_json(world, "trust", "list") == []
    # nothing depends on clinic-c: no --yes needed
    world("target", "remove", "clinic-c")


def test_client_and_issuer_remove_need_yes_when_trusts_name_them(world, ehr):
    refused(world, "client", "remove", "vendor", mentions=("1 trust(s)", "--yes"))
    refused(world, "issuer", "remove", ehr.issuer, mentions=("1 trust(s)", "--yes"))
    world("client", "remove", "other")  # no trusts
    world("issuer", "remove", ehr.issuer, "--yes")
    assert as_json(world, "trust", "list") == []


# -- secrets given by mistake --------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ("client", "add", "x", "--secret-env"),
    ("client", "rotate-secret", "vendor", "--secret-env"),
    ("client", "update", "vendor", "--secret-env"),
    ("target", "add", "https://fhir.x.example/fhir", "--name", "x", "--introspection-secret-env"),
    ("issuer", "update", "ISSUER", "--introspection-secret-env"),
])
def test_a_secret_given_instead_of_a_variable_name_is_refused_without_echoing_it(world, ehr, args):
    secret = "s3cr3t-value/with+chars=" + "q" * 30
    args = tuple(ehr.issuer if a == "ISSUER" else a for a in args)
    r = Refusals(world)(*args, secret)
    assert secret not in r and "q" * 30 not in r
    assert "NAME of an environment variable" in r


# -- clear database failures ------------------------------------------------------------------
def test_a_database_without_schema_says_to_run_db_upgrade(tmp_path):
    cli = CLI(base_env(f"sqlite:///{tmp_path}/fresh.db"))
    r = cli("client", "list", check=False)
    assert r.exit_code == 1
    assert r.stderr.strip() == "error: the database has no schema (or an older one): run `token-exchange db upgrade`"


# -- control characters never reach the terminal raw -----------------------------------------
def test_list_and_show_escape_control_characters_stored_by_other_means(world, db_url):
    if not db_url.startswith("sqlite"):
        pytest.skip("the raw write below uses SQLite's driver; the escaping is the same for every backend")
    path = db_url[len("sqlite:///"):]
    with sqlite3.connect(path) as conn:  # as if written by an older version or by hand
        conn.execute("UPDATE patient_link SET target_patient = ?", (f"b-{ESC}456\x07",))
    out = world("link", "list").stdout
    assert "\x1b" not in out and "\x07" not in out and "b-\\x1b[31m456\\x07" in out
    assert as_json(world, "link", "list")[0]["target_patient"] == f"b-{ESC}456\x07"  # JSON escapes it itself
    assert "\x1b" not in world("link", "list", "--json").stdout


def test_link_import_refuses_control_characters_naming_the_line(world, tmp_path):
    for i, row in enumerate([f"{SOURCE},p-{ESC}1,{TARGET},q-1", f"{SOURCE},p-1,{TARGET},q\x00-1",
                             f"{SOURCE}/\x07,p-1,{TARGET},q-1", f"{SOURCE},p-1,{TARGET},q-\u202e1"]):
        r = refused(world, "link", "import", write_csv(tmp_path / f"c{i}.csv", [LINK_HEADER, row]), mentions=":2:")
        assert "\x1b" not in r and "\x00" not in r and "\x07" not in r and "\u202e" not in r


# -- links of every origin -----------------------------------------------------------------
def test_link_import_reads_standard_input_and_accepts_target_names(world):
    r = world("link", "import", "-", input=f"{LINK_HEADER}\n{SOURCE},p-1,clinic-c,q-1\n")
    assert r.stdout == "imported 1 links\n"
    assert [(lk["patient"], lk["target"]) for lk in as_json(world, "link", "list", "--target", "clinic-c")] == [
        ("p-1", TARGET2)]


def test_link_export_neutralises_formula_cells_and_import_reads_them_back(world, tmp_path):
    world("link", "add", "--source", SOURCE, "--patient", "=HYPERLINK(1)", "--target", TARGET2,
          "--target-patient", "@SUM(A1)")
    world("link", "add", "--source", SOURCE, "--patient", "-2+3", "--target", TARGET2, "--target-patient", "+1")
    out = world("link", "export").stdout.splitlines()
    assert f"{SOURCE},'=HYPERLINK(1),{TARGET2},'@SUM(A1)" in out and f"{SOURCE},'-2+3,{TARGET2},'+1" in out
    path = tmp_path / "export.csv"
    world("link", "export", str(path))
    world("link", "remove", "--source", SOURCE, "--patient", "=HYPERLINK(1)", "--target", TARGET2)
    world("link", "remove", "--source", SOURCE, "--patient", "-2+3", "--target", TARGET2)
    world("link", "remove", "--source", SOURCE, "--patient", "a-123", "--target", TARGET)
    world("link", "import", str(path))
    got = {(lk["patient"], lk["target_patient"]) for lk in as_json(world, "link", "list")}
    assert got == {("a-123", "b-456"), ("=HYPERLINK(1)", "@SUM(A1)"), ("-2+3", "+1")}


def test_link_block_is_listed_by_origin_and_removed_like_a_link(world):
    world("link", "block", "--source", SOURCE, "--patient", "a-9", "--target", "hospital-b")
    blocked = as_json(world, "link", "list", "--origin", "blocked")
    assert blocked == [{"source": SOURCE, "patient": "a-9", "target": TARGET, "target_patient": None,
                        "origin": "blocked", "system": None, "matched_at": None}]
    assert [lk["patient"] for lk in as_json(world, "link", "list", "--origin", "table")] == ["a-123"]
    refused(world, "link", "add", "--source", SOURCE, "--patient", "a-9", "--target", TARGET,
            "--target-patient", "b-9", mentions="block")
    refused(world, "link", "block", "--source", SOURCE, "--patient", "a-123", "--target", TARGET,
            mentions="table link")
    assert world("link", "remove", "--source", SOURCE, "--patient", "a-9", "--target", TARGET).stdout == \
        "block removed\n"
    assert world("link", "export").stdout.splitlines() == [LINK_HEADER, f"{SOURCE},a-123,{TARGET},b-456"]


def test_link_import_names_the_line_of_a_link_already_stored(world, tmp_path):
    path = write_csv(tmp_path / "l.csv", [LINK_HEADER, f"{SOURCE},p-1,{TARGET},q-1", f"{SOURCE},p-2,{TARGET},q-2",
                                          f"{SOURCE},a-123,{TARGET},b-999"])
    refused(world, "link", "import", path, mentions=(":4:", "a-123", "already stored"))


# -- keys -----------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["PS256", "ES256", "ES384"])
def test_keys_rotate_with_an_algorithm_makes_a_key_of_it(cli, alg):
    cli("keys", "rotate", "--alg", alg)
    (active,) = [k for k in as_json(cli, "keys", "list") if k["state"] == "active"]
    assert active["alg"] == alg
    cli("keys", "rotate")  # default: the active key's algorithm
    (active,) = [k for k in as_json(cli, "keys", "list") if k["state"] == "active"]
    assert active["alg"] == alg


def test_keys_rotate_with_another_algorithm_than_the_staged_key_fails(cli):
    cli("keys", "stage", "--alg", "ES256")
    refused(cli, "keys", "rotate", "--alg", "RS256", mentions=("staged", "ES256"))
    cli("keys", "rotate")
    (active,) = [k for k in as_json(cli, "keys", "list") if k["state"] == "active"]
    assert active["alg"] == "ES256"
