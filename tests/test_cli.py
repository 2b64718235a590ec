"""The admin CLI (contract: "Admin CLI", "Data the service keeps"), through its
real click commands: every failure is one `error:` line on stderr and changes
nothing; secrets are never printed; every list/show speaks JSON; links
round-trip through CSV; keys stage, rotate and prune; every change is audited."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest

from conftest import (CLI, EHR_INTROSPECTION_SECRET, OTHER_SECRET, TARGET2_SECRET, TARGET_SECRET, TE,
                      VENDOR_SECRET, audit_rows, post_token)
from fakes import SOURCE, TARGET, TARGET2, UPSTREAM, free_port, new_key

SECRETS = (VENDOR_SECRET, OTHER_SECRET, TARGET_SECRET, TARGET2_SECRET, EHR_INTROSPECTION_SECRET)
LINK_HEADER = "source,patient,target,target_patient"
NEW_ISSUER = "https://ehr.new.example/oauth2"
NEW_TARGET = "https://fhir.new.example/fhir"
MINIMAL = {"grant_type": TE}  # authenticates, then fails on the missing subject_token
LISTS = [("issuer", "list"), ("target", "list"), ("client", "list"), ("trust", "list"), ("link", "list"),
         ("keys", "list"), ("audit", "list"), ("audit", "list", "--admin")]


# -- helpers ------------------------------------------------------------------------
def as_json(cli, *args):
    r = cli(*args, "--json")
    return json.loads(r.stdout)


def state(cli):
    """Everything the CLI can show, as JSON: the admin audit included, so a refused
    change that still records an admin event is a change."""
    return {" ".join(a): as_json(cli, *a) for a in LISTS}


class Refusals:
    """Runs commands that must fail: non-zero exit, exactly one `error:` line on
    stderr, nothing on stdout, and nothing changed: all lists the same as before
    the first refusal, checked after each one (each=True) or, for long loops of
    refusals, once by `unchanged()` at the end (a refused command cannot undo
    another's change, so a change anywhere still shows)."""

    def __init__(self, cli, each=True):
        self.cli = cli
        self.each = each
        self.before = state(cli)

    def __call__(self, *args, mentions=()):
        r = self.cli(*args, check=False)
        assert r.exit_code != 0, f"{args} succeeded: {r.stdout}"
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert r.stdout == "", (args, r.stdout)
        for word in ([mentions] if isinstance(mentions, str) else mentions):
            assert word in lines[0], (args, lines[0], word)
        if self.each:
            assert state(self.cli) == self.before, f"{args} failed but changed something"
        return lines[0]

    def unchanged(self):
        assert state(self.cli) == self.before, "a refused command changed something"


def refused(cli, *args, mentions=()):
    return Refusals(cli)(*args, mentions=mentions)


def admin_actions(cli):
    return [e["action"] for e in as_json(cli, "audit", "list", "--admin")]


def write_csv(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def public_jwks(alg="RS384", kid="k1", private=False):
    key = new_key(alg)
    algo = jwt.get_algorithm_by_name(alg)
    jwk = json.loads(algo.to_jwk(key if private else key.public_key()))
    jwk.update(kid=kid, alg=alg, use="sig")
    return {"keys": [jwk]}


def active_kid(cli):
    (kid,) = [k["kid"] for k in as_json(cli, "keys", "list") if k["state"] == "active"]
    return kid


# -- every failure: one line, non-zero, nothing changed -----------------------------------
def test_trust_add_naming_an_unknown_client_issuer_or_target_is_refused(world, ehr):
    refuse = Refusals(world)
    for unknown, value in [("client", "ghost"), ("issuer", "https://ghost.example/as"),
                           ("target", "https://ghost.example/fhir")]:
        args = {"client": "vendor", "issuer": ehr.issuer, "target": TARGET2, unknown: value}
        refuse("trust", "add", "--client", args["client"], "--issuer", args["issuer"], "--target", args["target"],
               "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM, mentions=(f"no {unknown}", value))


BAD_URLS = ["/relative/path", "fhir.example/fhir", "https://fhir.example/fhir#frag", "https://fhir.example/fhir#",
            "ftp://fhir.example/fhir", "https://", "urn:example:fhir", "https://fhir.example/ fhir", ""]


def test_malformed_urls_are_refused_wherever_a_url_is_given(world):
    refuse = Refusals(world, each=False)
    ok = ["--jwks-uri", "https://ehr.new.example/jwks", "--source", SOURCE]
    for bad in BAD_URLS:
        refuse("issuer", "add", bad, *ok)
        refuse("issuer", "add", NEW_ISSUER, "--jwks-uri", bad, "--source", SOURCE)
        refuse("issuer", "add", NEW_ISSUER, *ok, "--source", bad)
        refuse("issuer", "add", NEW_ISSUER, *ok, "--introspection-endpoint", bad)
        refuse("target", "add", bad)
        refuse("client", "add", "new-client", "--jwks-uri", bad)
        refuse("link", "add", "--source", bad, "--patient", "p1", "--target", TARGET, "--target-patient", "q1")
    refuse.unchanged()


def test_adding_what_already_exists_is_refused(world, ehr):
    refuse = Refusals(world)
    refuse("issuer", "add", ehr.issuer, "--jwks-uri", ehr.issuer + "/jwks", "--source", SOURCE,
           mentions="already exists")
    refuse("target", "add", TARGET, mentions="already exists")
    refuse("target", "add", NEW_TARGET, "--name", "hospital-b", mentions="hospital-b")
    refuse("client", "add", "vendor", "--secret-env", "OTHER_SECRET", mentions="already exists")
    refuse("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET,
           "--scopes", "patient/Observation.rs", "--upstream-client-id", UPSTREAM, mentions="already exists")
    refuse("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", TARGET,
           "--target-patient", "b-999", mentions="already exists")


def test_a_link_is_unique_per_source_patient_and_target_only(world):
    world("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", TARGET2, "--target-patient", "c-1")
    world("link", "add", "--source", SOURCE + "-2", "--patient", "a-123", "--target", TARGET,
          "--target-patient", "b-2")
    assert len(as_json(world, "link", "list")) == 3


def test_a_secret_env_var_that_is_unset_or_empty_is_refused_naming_the_option_not_the_value(world, env):
    """Operators' additions: a failure names the --*-env option, never the value given to it
    (a secret given there by mistake can look like a variable's name)."""
    env["EMPTY_VAR"] = ""
    refuse = Refusals(world)
    for var in ("NO_SUCH_VAR_0123", "EMPTY_VAR"):
        for args, option in (
                (("client", "add", "new-client", "--secret-env", var), "--secret-env"),
                (("client", "rotate-secret", "vendor", "--secret-env", var), "--secret-env"),
                (("issuer", "add", NEW_ISSUER, "--jwks-uri", NEW_ISSUER + "/jwks", "--source", SOURCE,
                  "--introspection-endpoint", NEW_ISSUER + "/introspect", "--introspection-client-id", "te",
                  "--introspection-secret-env", var), "--introspection-secret-env"),
                (("target", "add", NEW_TARGET, "--name", "new", "--introspection-secret-env", var),
                 "--introspection-secret-env")):
            line = refuse(*args, mentions=option)
            assert var not in line


def test_secrets_shorter_than_32_characters_are_refused(world, env):
    env["SHORT"] = "s" * 31
    env["JUST_LONG_ENOUGH"] = "L" * 32
    refuse = Refusals(world)
    refuse("client", "add", "new-client", "--secret-env", "SHORT", mentions="32")
    refuse("client", "rotate-secret", "vendor", "--secret-env", "SHORT", mentions="32")
    refuse("target", "add", NEW_TARGET, "--name", "new", "--introspection-secret-env", "SHORT", mentions="32")
    world("client", "add", "new-client", "--secret-env", "JUST_LONG_ENOUGH")
    world("target", "add", NEW_TARGET, "--name", "new", "--introspection-secret-env", "JUST_LONG_ENOUGH")


BAD_SCOPES = ["", "   ", "openid", "patient/*.rs openid", "fhirUser patient/*.rs", "launch/patient patient/*.rs",
              "offline_access", "launch", "patient/Observation.xyz", "patient/observation.rs", "patient/*",
              "practitioner/*.rs", "patient/Observation.rs?category", "patient/*.rs\tuser/*.rs",
              "patient/*.rs\nuser/*.rs", 'patient/"x".rs', "patient/Observation.sr"]


def test_trust_scopes_must_be_well_formed_smart_resource_scopes(world, ehr):
    refuse = Refusals(world, each=False)
    for scopes in BAD_SCOPES:
        refuse("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET2,
               "--scopes", scopes, "--upstream-client-id", UPSTREAM, mentions="--scopes")
    refuse.unchanged()


def test_trust_accepts_v1_v2_wildcard_and_parameter_scopes_verbatim(world, ehr):
    text = "patient/Observation.read user/*.cruds system/Patient.rs patient/Observation.rs?category=laboratory"
    world("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET2, "--scopes", text,
          "--upstream-client-id", UPSTREAM, "--max-ttl", "120", "--allow-id-token")
    row = [t for t in as_json(world, "trust", "list") if t["target"] == TARGET2]
    assert row == [{"client": "vendor", "issuer": ehr.issuer, "target": TARGET2, "scopes": text,
                    "upstream_client_id": UPSTREAM, "max_ttl": 120, "allow_id_token": True,
                    "allow_jwt_grant": False, "consent": "none", "consent_max_days": 90,
                    "consent_signer": "patient", "require_dpop": False}]


def test_issuer_add_refusals(world):
    """Exactly one of --jwks-uri and --discover; at least one --source; asymmetric
    --algs only (never HMAC, never none); introspection credentials all together."""
    refuse = Refusals(world)
    refuse("issuer", "add", NEW_ISSUER, "--source", SOURCE, mentions="--jwks-uri")
    refuse("issuer", "add", NEW_ISSUER, "--source", SOURCE, "--jwks-uri", NEW_ISSUER + "/jwks", "--discover",
           mentions="--discover")
    base = ["issuer", "add", NEW_ISSUER, "--jwks-uri", NEW_ISSUER + "/jwks", "--source", SOURCE]
    refuse(*base[:-2], mentions="--source")
    for algs in ["HS256", "none", "RS256,HS256", "RS256,none", "HS384,HS512", "", ",", "rs256"]:
        refuse(*base, "--algs", algs, mentions="--algs")
    refuse(*base, "--introspection-client-id", "te", "--introspection-secret-env", "EHR_SECRET",
           mentions="--introspection-endpoint")
    refuse(*base, "--introspection-endpoint", NEW_ISSUER + "/introspect", "--introspection-secret-env", "EHR_SECRET",
           mentions="--introspection-client-id")
    refuse(*base, "--introspection-endpoint", NEW_ISSUER + "/introspect", "--introspection-client-id", "te",
           mentions="--introspection-secret-env")


def test_trust_target_and_client_add_refusals(world, ehr, tmp_path):
    """A trust needs an upstream client id; a target that introspects needs a name;
    a client needs exactly one credential, a plain id, and public keys only."""
    refuse = Refusals(world)
    refuse("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET2,
           "--scopes", "patient/*.rs", "--upstream-client-id", " ", mentions="--upstream-client-id")
    refuse("target", "add", NEW_TARGET, "--introspection-secret-env", "TARGET_SECRET", mentions="--name")
    refuse("client", "add", "new-client", mentions="exactly one")
    refuse("client", "add", "new-client", "--secret-env", "VENDOR_SECRET", "--generate-secret",
           mentions="exactly one")
    refuse("client", "add", "new client", "--secret-env", "VENDOR_SECRET", mentions="CLIENT_ID")
    refuse("client", "add", "x" * 256, "--secret-env", "VENDOR_SECRET", mentions="CLIENT_ID")
    refuse("client", "rotate-secret", "vendor", mentions="exactly one")
    files = {"private.json": json.dumps(public_jwks(private=True)), "garbage.json": "{not json",
             "empty.json": json.dumps({"keys": []})}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    refuse("client", "add", "new-client", "--jwks-file", str(tmp_path / "private.json"), mentions="private")
    refuse("client", "add", "new-client", "--jwks-file", str(tmp_path / "garbage.json"), mentions="--jwks-file")
    refuse("client", "add", "new-client", "--jwks-file", str(tmp_path / "empty.json"), mentions="--jwks-file")
    refuse("client", "add", "new-client", "--jwks-file", str(tmp_path / "missing.json"), mentions="--jwks-file")


def test_show_and_remove_of_unknown_things_are_refused(world, ehr):
    refuse = Refusals(world)
    refuse("issuer", "show", "https://ghost.example/as", mentions="no issuer")
    refuse("issuer", "remove", "https://ghost.example/as", mentions="no issuer")
    refuse("target", "show", "https://ghost.example/fhir", mentions="no target")
    refuse("target", "remove", "https://ghost.example/fhir", mentions="no target")
    refuse("client", "show", "ghost", mentions="no client")
    refuse("client", "remove", "ghost", mentions="no client")
    refuse("client", "rotate-secret", "ghost", "--secret-env", "OTHER_SECRET", mentions="no client")
    refuse("trust", "remove", "--client", "other", "--issuer", ehr.issuer, "--target", TARGET,
           mentions="no such trust")
    refuse("link", "remove", "--source", SOURCE, "--patient", "a-999", "--target", TARGET, mentions="no such link")


def test_usage_errors_are_one_line_too(world):
    refuse = Refusals(world)
    for args in [
        ("trust", "add"),  # missing options
        ("client", "add"),  # missing argument
        ("audit", "list", "--outcome", "maybe"),
        ("target", "add", NEW_TARGET, "--max-ttl", "0"),
        ("trust", "add", "--client", "vendor", "--issuer", "https://x.example", "--target", TARGET, "--scopes",
         "patient/*.rs", "--upstream-client-id", "u", "--max-ttl", "soon"),
        ("keys", "rotate", "--alg", "HS256"),
        ("link", "import", "/nonexistent/links.csv"),
        ("client", "list", "--no-such-option"),
        ("frobnicate",),
    ]:
        assert "Usage:" not in refuse(*args)


# -- link import: all or nothing --------------------------------------------------------
GOOD_ROWS = [f"{SOURCE},p-1,{TARGET},q-1", f"{SOURCE},p-2,{TARGET2},q-2"]
BAD_IMPORTS = [
    ([], "first line"),
    (["source,patient,target", *GOOD_ROWS], "first line"),
    (["patient,source,target,target_patient", *GOOD_ROWS], "first line"),
    (["source;patient;target;target_patient"], "first line"),
    ([LINK_HEADER, *GOOD_ROWS, f"{SOURCE},p-3,https://ghost.example/fhir,q-3"], (":4:", "unknown target")),
    ([LINK_HEADER, *GOOD_ROWS, f"{SOURCE},p-1,{TARGET},q-other"], (":4:", "duplicate")),
    ([LINK_HEADER, *GOOD_ROWS, f"{SOURCE},a-123,{TARGET},b-999"], (":4:", "already stored")),
    ([LINK_HEADER, *GOOD_ROWS, f"{SOURCE},p-3,{TARGET}"], (":4:", "4 fields")),
    ([LINK_HEADER, *GOOD_ROWS, f"{SOURCE},p-3,{TARGET},q-3,extra"], (":4:", "4 fields")),
    ([LINK_HEADER, *GOOD_ROWS, f"{SOURCE},,{TARGET},q-3"], ":4:"),
    ([LINK_HEADER, *GOOD_ROWS, f"{SOURCE},p-3,{TARGET},"], ":4:"),
    ([LINK_HEADER, *GOOD_ROWS, f"fhir.a.example/fhir,p-3,{TARGET},q-3"], ":4:"),
    ([LINK_HEADER, *GOOD_ROWS, f"{SOURCE}#frag,p-3,{TARGET},q-3"], ":4:"),
    ([LINK_HEADER, *GOOD_ROWS, f"{SOURCE},p 3,{TARGET},q-3"], ":4:"),
    ([LINK_HEADER, *GOOD_ROWS, f"{SOURCE},{'p' * 256},{TARGET},q-3"], ":4:"),
]


def test_link_import_refuses_a_bad_file_whole(world, tmp_path):
    refuse = Refusals(world)
    for i, (lines, mentions) in enumerate(BAD_IMPORTS):
        refuse("link", "import", write_csv(tmp_path / f"links{i}.csv", lines), mentions=mentions)
    path = tmp_path / "latin1.csv"  # not UTF-8 text
    path.write_bytes((LINK_HEADER + "\n").encode() + f"{SOURCE},p-\xe9,{TARGET},q-1\n".encode("latin-1"))
    refuse("link", "import", str(path), mentions="latin1.csv")


def test_link_import_duplicate_means_same_source_patient_and_target(world, tmp_path):
    rows = [f"{SOURCE},p-1,{TARGET},q-1", f"{SOURCE},p-1,{TARGET2},q-1",  # one patient, two targets
            f"https://ehr.other.example/fhir,p-1,{TARGET},q-9"]  # the same id at another source
    assert world("link", "import", write_csv(tmp_path / "links.csv", [LINK_HEADER, *rows])).stdout == "imported 3 links\n"


def test_link_import_accepts_a_utf8_bom_and_crlf_as_spreadsheets_write(world, tmp_path):
    path = tmp_path / "links.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join([LINK_HEADER, *GOOD_ROWS, ""]).encode())
    assert world("link", "import", str(path)).stdout == "imported 2 links\n"
    assert len(as_json(world, "link", "list")) == 3


# -- --since ---------------------------------------------------------------------------
def test_since_must_be_iso_8601(world):
    refuse = Refusals(world, each=False)
    for since in ["yesterday", "2024-13-01", "31/01/2024", "2024-01-01T25:00:00Z", "now-1h", ""]:
        for cmd in (("audit", "list"), ("audit", "list", "--admin"), ("audit", "export", "--format", "fhir")):
            refuse(*cmd, "--since", since, mentions="--since")
    refuse.unchanged()


def test_since_honours_the_utc_offset_given(world):
    events = as_json(world, "audit", "list", "--admin")
    last = datetime.fromisoformat(events[-1]["time"])
    # one minute before the last change, spelled at UTC+05:00: the last change is included
    before = (last - timedelta(minutes=1)).astimezone(timezone(timedelta(hours=5))).isoformat()
    assert as_json(world, "audit", "list", "--admin", "--since", before)[-1] == events[-1]
    # one minute after it, spelled at UTC-05:00: nothing is
    after = (last + timedelta(minutes=1)).astimezone(timezone(timedelta(hours=-5))).isoformat()
    assert as_json(world, "audit", "list", "--admin", "--since", after) == []
    zulu = (last - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert as_json(world, "audit", "list", "--admin", "--since", zulu)[-1] == events[-1]


# -- secrets are never printed ---------------------------------------------------------
def test_no_secret_appears_in_any_list_show_or_audit_output(world, ehr, exchange):
    assert exchange().status_code == 200  # an exchange audit row too
    generated = world("client", "add", "gen", "--generate-secret").stdout.split("client_secret: ")[1].split()[0]
    commands = [("issuer", "list"), ("issuer", "show", ehr.issuer), ("target", "list"),
                ("target", "show", TARGET), ("target", "show", TARGET2), ("client", "list"),
                ("client", "show", "vendor"), ("client", "show", "other"), ("client", "show", "gen"),
                ("trust", "list"), ("link", "list"), ("keys", "list"), ("audit", "list"),
                ("audit", "list", "--admin")]
    outputs = []
    for cmd in commands:
        for extra in ((), ("--json",)):
            r = world(*cmd, *extra)
            outputs.append(r.stdout + r.stderr)
    for cmd in (("audit", "export", "--format", "fhir"), ("link", "export")):
        r = world(*cmd)
        outputs.append(r.stdout + r.stderr)
    for out in outputs:
        for secret in (*SECRETS, generated):
            assert secret not in out
    issuer = as_json(world, "issuer", "show", ehr.issuer)
    assert issuer["introspection_secret"] == "set"
    assert as_json(world, "target", "show", TARGET)["introspection_secret"] == "set"


def test_generate_secret_prints_a_strong_secret_exactly_once_and_it_works(world, http):
    r = world("client", "add", "gen", "--generate-secret")
    lines = [line for line in r.stdout.splitlines() if line.startswith("client_secret: ")]
    assert len(lines) == 1
    secret = lines[0].removeprefix("client_secret: ")
    assert len(secret) >= 32 and secret.strip() == secret and " " not in secret
    assert r.stdout.count(secret) == 1 and secret not in r.stderr
    assert post_token(http, MINIMAL, auth=("gen", secret)).get_json()["error"] == "invalid_request"
    # another client, another secret
    r2 = world("client", "add", "gen2", "--generate-secret")
    assert secret not in r2.stdout
    # rotate-secret --generate-secret: printed once as well, and it replaces the old one
    r3 = world("client", "rotate-secret", "gen", "--generate-secret")
    (line,) = [line for line in r3.stdout.splitlines() if line.startswith("client_secret: ")]
    rotated = line.removeprefix("client_secret: ")
    assert len(rotated) >= 32 and rotated != secret and r3.stdout.count(rotated) == 1
    assert post_token(http, MINIMAL, auth=("gen", secret)).status_code == 401
    assert post_token(http, MINIMAL, auth=("gen", rotated)).status_code == 400


def test_keys_output_never_holds_private_key_material(cli):
    cli("keys", "stage", "--alg", "ES256")
    cli("keys", "rotate")
    cli("keys", "rotate", "--alg", "RS256")
    cli("keys", "stage")
    for extra in ((), ("--json",)):
        out = cli("keys", "list", *extra).stdout
        assert "PRIVATE KEY" not in out and '"d"' not in out and "BEGIN" not in out
    rows = as_json(cli, "keys", "list")
    assert len(rows) == 4
    for row in rows:
        assert set(row) == {"kid", "alg", "state", "created", "activated", "retired"}


def test_secrets_and_private_keys_are_not_stored_in_plaintext(env, ehr):
    """Client and target secrets are stored as salted HMACs; with
    TOKEN_EXCHANGE_KEY_SECRET set, private keys and the EHR introspection secret are
    sealed too: no plaintext of any of them anywhere in the database."""
    from sqlalchemy import MetaData, create_engine, select

    from token_exchange.db import normalize_url
    env["TOKEN_EXCHANGE_KEY_SECRET"] = "key-secret-for-tests-0123456789abcdef"
    cli = CLI(env)
    cli("db", "upgrade")
    cli("issuer", "add", ehr.issuer, "--jwks-uri", ehr.issuer + "/jwks", "--source", SOURCE,
        "--introspection-endpoint", ehr.issuer + "/introspect", "--introspection-client-id", "te",
        "--introspection-secret-env", "EHR_SECRET")
    cli("target", "add", TARGET, "--name", "hospital-b", "--introspection-secret-env", "TARGET_SECRET")
    cli("client", "add", "vendor", "--secret-env", "VENDOR_SECRET")
    cli("keys", "rotate")
    engine = create_engine(normalize_url(env["TOKEN_EXCHANGE_DATABASE_URL"]))
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            dump = "\n".join(repr(row) for t in meta.sorted_tables for row in conn.execute(select(t)))
    finally:
        engine.dispose()
    assert "hospital-b" in dump  # the dump is real
    for secret in (VENDOR_SECRET, TARGET_SECRET, EHR_INTROSPECTION_SECRET, "PRIVATE KEY",
                   env["TOKEN_EXCHANGE_KEY_SECRET"]):
        assert secret not in dump, secret


# -- --json on every list and show --------------------------------------------------------
def test_every_list_and_show_takes_json_with_the_documented_fields(world, ehr):
    issuer = {"issuer": ehr.issuer, "jwks_uri": ehr.issuer + "/jwks", "algs": ["RS256", "RS384", "ES256", "ES384"],
              "sources": [SOURCE], "audiences": [], "patient_claim": "patient", "source_claim": "source",
              "introspection_endpoint": ehr.issuer + "/introspect", "introspection_client_id": "te",
              "introspection_secret": "set", **NO_MATCHING_OR_LOGIN}
    assert as_json(world, "issuer", "show", ehr.issuer) == issuer
    assert as_json(world, "issuer", "list") == [issuer]
    target_b = {"base_url": TARGET, "name": "hospital-b", "max_ttl": None, "introspection_secret": "set",
                "match_identifiers": [], "match_ttl_days": 30, **AS_IS}
    target_c = {"base_url": TARGET2, "name": "clinic-c", "max_ttl": None, "introspection_secret": "set",
                "match_identifiers": [], "match_ttl_days": 30, **AS_IS}
    assert as_json(world, "target", "show", TARGET) == target_b
    assert as_json(world, "target", "list") == [target_b, target_c]
    clients = as_json(world, "client", "list")
    assert [c["client_id"] for c in clients] == ["other", "vendor"]
    vendor = as_json(world, "client", "show", "vendor")
    assert vendor == clients[1]
    assert set(vendor) == {"client_id", "name", "auth_methods", "jwks_uri", "jwks_kids", "redirect_uris", "created",
                           "disabled", "require_dpop"}
    assert vendor["auth_methods"] == "client_secret_basic,client_secret_post"
    assert vendor["jwks_uri"] is None and vendor["jwks_kids"] is None
    assert datetime.fromisoformat(vendor["created"])
    assert as_json(world, "trust", "list") == [
        {"client": "vendor", "issuer": ehr.issuer, "target": TARGET, "scopes": "patient/*.rs user/*.rs",
         "upstream_client_id": UPSTREAM, "max_ttl": None, "allow_id_token": False, "allow_jwt_grant": False,
         "consent": "none", "consent_max_days": 90, "consent_signer": "patient", "require_dpop": False}]
    assert as_json(world, "link", "list") == [
        {"source": SOURCE, "patient": "a-123", "target": TARGET, "target_patient": "b-456", "origin": "table",
         "system": None, "matched_at": None}]
    (key,) = as_json(world, "keys", "list")
    assert set(key) == {"kid", "alg", "state", "created", "activated", "retired"}
    assert key["state"] == "active" and key["alg"] == "RS256" and key["retired"] is None
    assert datetime.fromisoformat(key["created"]).tzinfo is not None
    assert as_json(world, "audit", "list") == []
    for event in as_json(world, "audit", "list", "--admin"):
        assert set(event) == {"time", "actor", "action", "detail"}


def test_plain_lists_are_a_table_and_shows_are_key_value_lines(world, ehr, cli):
    lines = world("target", "list").stdout.splitlines()
    assert lines[0].split() == ["base_url", "name", "max_ttl"]
    assert lines[1].split() == [TARGET, "hospital-b", "-"] and lines[2].split() == [TARGET2, "clinic-c", "-"]
    shown = world("client", "show", "vendor").stdout.splitlines()
    assert shown[0] == "client_id: vendor"
    world("link", "remove", "--source", SOURCE, "--patient", "a-123", "--target", TARGET)
    assert world("link", "list").stdout == "(none)\n"
    assert as_json(world, "link", "list") == []


AS_IS = {"users": "as-is", "user_match_identifiers": []}
NO_MATCHING_OR_LOGIN = {"identifier_systems": [], "identifier_claim": "patient_identifier",
                        "user_identifier_systems": [], "user_identifier_claim": "fhirUser_identifier",
                        "fhir_client_id": None,
                        "fhir_scope": None, "token_endpoint": None, "authorization_endpoint": None,
                        "login_client_id": None, "login_secret": None}


def test_issuer_add_stores_every_option_given(cli):
    cli("issuer", "add", NEW_ISSUER, "--jwks-uri", NEW_ISSUER + "/keys", "--source", SOURCE,
        "--source", SOURCE + "-2", "--source", SOURCE, "--audience", "https://api.new.example",
        "--algs", "ES384, PS256", "--patient-claim", "pid", "--source-claim", "fhir_base",
        "--introspection-endpoint", NEW_ISSUER + "/introspect")
    assert as_json(cli, "issuer", "show", NEW_ISSUER) == {
        "issuer": NEW_ISSUER, "jwks_uri": NEW_ISSUER + "/keys", "algs": ["ES384", "PS256"],
        "sources": [SOURCE, SOURCE + "-2"], "audiences": ["https://api.new.example"], "patient_claim": "pid",
        "source_claim": "fhir_base", "introspection_endpoint": NEW_ISSUER + "/introspect",
        "introspection_client_id": None, "introspection_secret": None, **NO_MATCHING_OR_LOGIN}


def test_target_add_stores_name_and_max_ttl(cli):
    cli("target", "add", NEW_TARGET, "--max-ttl", "60")
    assert as_json(cli, "target", "show", NEW_TARGET) == {
        "base_url": NEW_TARGET, "name": None, "max_ttl": 60, "introspection_secret": None,
        "match_identifiers": [], "match_ttl_days": 30, **AS_IS}


def test_client_add_with_public_keys_registers_private_key_jwt(cli, tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(public_jwks(kid="vendor-k1")))
    cli("client", "add", "pkj", "--jwks-file", str(path))
    cli("client", "add", "pku", "--jwks-uri", "https://vendor.example/jwks.json")
    pkj = as_json(cli, "client", "show", "pkj")
    assert pkj["auth_methods"] == "private_key_jwt" and pkj["jwks_kids"] == ["vendor-k1"]
    assert pkj["jwks_uri"] is None
    pku = as_json(cli, "client", "show", "pku")
    assert pku["auth_methods"] == "private_key_jwt" and pku["jwks_uri"] == "https://vendor.example/jwks.json"


def test_audit_list_json_has_the_contract_fields_and_filters(world, exchange, ehr):
    assert exchange().status_code == 200
    assert exchange(scope="patient/Observation.c").status_code == 400
    fields = {"time", "client_id", "issuer", "subject", "target", "source_patient", "target_patient",
              "scope_requested", "scope_granted", "outcome", "error", "jti", "event", "grant", "consent", "link",
              "assertion_jti", "request_id", "reason", "user_link", "source_user", "target_user", "dpop_jkt"}
    rows = audit_rows(world)
    assert [r["outcome"] for r in rows] == ["granted", "refused"]
    for r in rows:
        assert set(r) == fields and r["client_id"] == "vendor" and r["target"] == TARGET
        assert datetime.fromisoformat(r["time"]).tzinfo is not None
    granted, refused_row = rows
    assert granted["issuer"] == ehr.issuer and granted["subject"] == "user-1"
    assert granted["source_patient"] == "a-123" and granted["target_patient"] == "b-456"
    assert granted["scope_granted"] == "patient/Observation.rs" and granted["jti"] and granted["error"] is None
    assert refused_row["error"] == "invalid_scope" and not refused_row["scope_granted"]
    assert audit_rows(world, "--outcome", "granted") == [granted]
    assert audit_rows(world, "--outcome", "refused") == [refused_row]
    assert audit_rows(world, "--client", "other") == []
    assert audit_rows(world, "--since", "2000-01-01T00:00:00Z") == rows
    assert audit_rows(world, "--since", (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()) == []
    bundle = json.loads(world("audit", "export", "--format", "fhir").stdout)
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) == 2



def test_audit_time_is_stored_in_the_form_of_every_other_timestamp(world, exchange, env):
    """The hot path writes audit rows without the ORM; their time still goes through the
    column type (on SQLite the text form SQLAlchemy writes everywhere, so --since compares
    like with like), never through the driver's default datetime adapter."""
    import re
    from sqlalchemy import create_engine, text
    assert exchange().status_code == 200
    engine = create_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            audit = conn.execute(text("SELECT CAST(time AS TEXT) FROM audit_event")).scalar_one()
            admin = conn.execute(text("SELECT CAST(time AS TEXT) FROM admin_event LIMIT 1")).scalar_one()
    finally:
        engine.dispose()
    def shape(stamp):  # digits and the length of the fraction aside (PostgreSQL trims its zeros)
        return re.sub(r"\d", "9", re.sub(r"\.\d+", "", stamp))
    assert shape(audit) == shape(admin), (audit, admin)

# -- links -----------------------------------------------------------------------------
def test_link_import_then_export_round_trips_the_csv(world, tmp_path):
    rows = [f"{SOURCE},p-1,{TARGET},q-1", f"{SOURCE}-2,p-2,{TARGET2},q-2", f'{SOURCE},"p,3",{TARGET},q-3',
            f"{SOURCE},p-1,{TARGET2},q-1c"]
    assert world("link", "import", write_csv(tmp_path / "in.csv", [LINK_HEADER, *rows])).stdout == \
        "imported 4 links\n"
    out = tmp_path / "out.csv"
    assert world("link", "export", str(out)).stdout == ""
    text = out.read_text(encoding="utf-8")
    expected = [LINK_HEADER.split(","), [SOURCE, "a-123", TARGET, "b-456"],
                *[next(csv.reader([r])) for r in rows]]
    assert list(csv.reader(text.splitlines())) == expected
    assert list(csv.reader(world("link", "export").stdout.splitlines())) == expected  # to stdout: the same
    # remove everything, import the export: the same links again
    listed = as_json(world, "link", "list")
    for link in listed:
        world("link", "remove", "--source", link["source"], "--patient", link["patient"], "--target", link["target"])
    assert as_json(world, "link", "list") == []
    assert world("link", "import", str(out)).stdout == "imported 5 links\n"
    assert as_json(world, "link", "list") == listed


def test_link_export_to_an_unwritable_path_is_refused(world, tmp_path):
    refused(world, "link", "export", str(tmp_path / "no-such-dir" / "out.csv"), mentions="out.csv")


def test_link_list_filters_by_source_and_target(world, tmp_path):
    world("link", "import", write_csv(tmp_path / "in.csv", [
        LINK_HEADER, f"{SOURCE},p-1,{TARGET2},q-1", f"{SOURCE}-2,p-2,{TARGET},q-2", f"{SOURCE}-2,p-3,{TARGET2},q-3"]))

    def pairs(*args):
        return [(link["patient"], link["target_patient"]) for link in as_json(world, "link", "list", *args)]
    assert pairs() == [("a-123", "b-456"), ("p-1", "q-1"), ("p-2", "q-2"), ("p-3", "q-3")]
    assert pairs("--source", SOURCE) == [("a-123", "b-456"), ("p-1", "q-1")]
    assert pairs("--target", TARGET2) == [("p-1", "q-1"), ("p-3", "q-3")]
    assert pairs("--source", SOURCE + "-2", "--target", TARGET) == [("p-2", "q-2")]
    assert pairs("--source", SOURCE + "/") == []  # URLs match exactly


def test_link_remove_removes_exactly_that_link(world):
    world("link", "add", "--source", SOURCE, "--patient", "a-123", "--target", TARGET2, "--target-patient", "c-1")
    assert world("link", "remove", "--source", SOURCE, "--patient", "a-123", "--target", TARGET).stdout == \
        "link removed\n"
    assert as_json(world, "link", "list") == [
        {"source": SOURCE, "patient": "a-123", "target": TARGET2, "target_patient": "c-1", "origin": "table",
         "system": None, "matched_at": None}]
    refused(world, "link", "remove", "--source", SOURCE, "--patient", "a-123", "--target", TARGET,
            mentions="no such link")


def test_removing_a_client_issuer_or_target_removes_what_names_it(world, ehr):
    world("trust", "add", "--client", "other", "--issuer", ehr.issuer, "--target", TARGET2,
          "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM)
    world("client", "remove", "other", "--yes")
    assert [t["client"] for t in as_json(world, "trust", "list")] == ["vendor"]
    world("target", "remove", TARGET, "--yes")
    assert as_json(world, "trust", "list") == [] and as_json(world, "link", "list") == []
    world("issuer", "remove", ehr.issuer)  # its trusts went with the target
    assert as_json(world, "issuer", "list") == []
    assert [c["client_id"] for c in as_json(world, "client", "list")] == ["vendor"]
    assert [t["base_url"] for t in as_json(world, "target", "list")] == [TARGET2]


# -- keys ------------------------------------------------------------------------------
def test_db_upgrade_makes_one_active_key_and_is_idempotent(cli):
    (key,) = as_json(cli, "keys", "list")
    cli("db", "upgrade")
    assert as_json(cli, "keys", "list") == [key]


def test_keys_rotate_activates_a_new_key_and_retires_the_old(cli):
    old = active_kid(cli)
    r = cli("keys", "rotate")
    new = active_kid(cli)
    assert new != old and r.stdout == f"active key is now {new} (RS256)\n"
    rows = {k["kid"]: k for k in as_json(cli, "keys", "list")}
    assert rows[old]["state"] == "retired" and rows[old]["retired"] is not None
    assert rows[new]["state"] == "active" and rows[new]["retired"] is None and rows[new]["activated"]
    cli("keys", "rotate", "--alg", "ES256")
    assert [(k["state"], k["alg"]) for k in as_json(cli, "keys", "list")] == [
        ("retired", "RS256"), ("retired", "RS256"), ("active", "ES256")]


def test_keys_stage_then_rotate_activates_the_staged_key(cli):
    old = active_kid(cli)
    cli("keys", "stage", "--alg", "ES256")
    (staged,) = [k for k in as_json(cli, "keys", "list") if k["state"] == "staged"]
    assert active_kid(cli) == old and staged["alg"] == "ES256" and staged["activated"] is None
    cli("keys", "rotate")
    assert active_kid(cli) == staged["kid"]
    states = {k["kid"]: k["state"] for k in as_json(cli, "keys", "list")}
    assert states == {old: "retired", staged["kid"]: "active"}
    assert [k["alg"] for k in as_json(cli, "keys", "list") if k["state"] == "active"] == ["ES256"]


def test_keys_prune_removes_retired_keys_only_after_their_grace(cli, env):
    first = active_kid(cli)
    cli("keys", "rotate")
    second = active_kid(cli)
    cli("keys", "stage")
    assert cli("keys", "prune").stdout == "pruned 0 key(s)\n"  # default grace: ttl + 60 s
    assert first in {k["kid"] for k in as_json(cli, "keys", "list")}
    env["TOKEN_EXCHANGE_KEY_GRACE"] = "0"
    assert cli("keys", "prune").stdout == "pruned 1 key(s)\n"
    assert sorted(k["state"] for k in as_json(cli, "keys", "list")) == ["active", "staged"]
    assert active_kid(cli) == second
    assert admin_actions(cli)[-1] == "keys.prune"
    assert cli("keys", "prune").stdout == "pruned 0 key(s)\n"
    assert admin_actions(cli)[-1] == "keys.prune" and admin_actions(cli).count("keys.prune") == 1


# -- client secrets --------------------------------------------------------------------
def test_rotate_secret_retires_the_old_secret_at_once(world, env, http):
    env["NEW_VENDOR_SECRET"] = "vendor-A-rotated-secret-0123456789abcd"
    assert post_token(http, MINIMAL).get_json()["error"] == "invalid_request"  # old works before
    world("client", "rotate-secret", "vendor", "--secret-env", "NEW_VENDOR_SECRET")
    r = post_token(http, MINIMAL)
    assert r.status_code == 401 and r.get_json()["error"] == "invalid_client"
    r = post_token(http, MINIMAL, auth=("vendor", env["NEW_VENDOR_SECRET"]))
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_request"
    # client_secret_post authenticates with the new secret too
    r = post_token(http, {**MINIMAL, "client_id": "vendor", "client_secret": env["NEW_VENDOR_SECRET"]}, auth=None)
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_request"


def test_a_refused_rotation_leaves_the_old_secret_working(world, env, http):
    env["SHORT"] = "too-short"
    refused(world, "client", "rotate-secret", "vendor", "--secret-env", "SHORT")
    assert post_token(http, MINIMAL).get_json()["error"] == "invalid_request"
    assert post_token(http, MINIMAL, auth=("vendor", "too-short")).status_code == 401


# -- the admin audit -------------------------------------------------------------------
def test_every_cli_change_is_recorded_with_actor_action_and_time(world, ehr, env, tmp_path):
    env["NEW_SECRET"] = "n" * 40
    world("client", "rotate-secret", "vendor", "--secret-env", "NEW_SECRET")
    world("link", "import", write_csv(tmp_path / "l.csv", [LINK_HEADER, f"{SOURCE},p-1,{TARGET},q-1"]))
    world("link", "remove", "--source", SOURCE, "--patient", "p-1", "--target", TARGET)
    world("keys", "stage")
    world("keys", "rotate")
    env["TOKEN_EXCHANGE_KEY_GRACE"] = "0"
    world("keys", "prune")
    world("trust", "remove", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET)
    world("client", "remove", "other")
    world("target", "remove", TARGET2)
    world("issuer", "remove", ehr.issuer)
    events = as_json(world, "audit", "list", "--admin")
    assert [e["action"] for e in events] == [
        "keys.create", "issuer.add", "target.add", "target.add", "client.add", "client.add", "trust.add",
        "link.add", "client.rotate-secret", "link.import", "link.remove", "keys.stage", "keys.rotate",
        "keys.prune", "trust.remove", "client.remove", "target.remove", "issuer.remove"]
    assert {e["actor"] for e in events} == {"test-admin"}
    times = [datetime.fromisoformat(e["time"]) for e in events]
    assert all(t.tzinfo is not None for t in times)
    assert times == sorted(times)
    assert times[-1] <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert times[-1] >= datetime.now(timezone.utc) - timedelta(minutes=1)  # the last changes: just now
    detail = {e["action"]: e["detail"] for e in events}
    assert ehr.issuer in detail["issuer.add"] and "vendor" in detail["client.rotate-secret"]
    assert "1 links" in detail["link.import"]
    # reads are not changes
    world("issuer", "list")
    world("link", "export")
    assert len(as_json(world, "audit", "list", "--admin")) == len(events)


def test_the_actor_defaults_to_the_os_user(cli, env):
    import getpass
    env["TOKEN_EXCHANGE_ADMIN"] = None  # CliRunner unsets it
    cli("client", "add", "x", "--generate-secret")
    assert as_json(cli, "audit", "list", "--admin")[-1]["actor"] in (getpass.getuser(), f"uid:{os.getuid()}")


# -- discovery -------------------------------------------------------------------------
class DocServer:
    """Serves whatever JSON documents a test puts in ``routes`` (path -> body)."""

    def __init__(self):
        self.routes = {}
        docs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                body = docs.routes.get(self.path.split("?")[0])
                data = json.dumps(body if body is not None else {"error": "not found"}).encode()
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def docs():
    d = DocServer()
    yield d
    d.stop()


def test_discover_reads_the_openid_configuration(cli, ehr):
    cli("issuer", "add", ehr.issuer, "--discover", "--source", SOURCE)
    shown = as_json(cli, "issuer", "show", ehr.issuer)
    assert shown["jwks_uri"] == ehr.issuer + "/jwks"
    assert shown["introspection_endpoint"] == ehr.issuer + "/introspect"
    assert shown["sources"] == [SOURCE]


def test_discover_falls_back_to_the_rfc8414_location(cli, docs):
    issuer = docs.base + "/tenant/as"
    docs.routes["/.well-known/oauth-authorization-server/tenant/as"] = {
        "issuer": issuer, "jwks_uri": issuer + "/keys", "token_endpoint": issuer + "/token"}
    cli("issuer", "add", issuer, "--discover", "--source", SOURCE)
    shown = as_json(cli, "issuer", "show", issuer)
    assert shown["jwks_uri"] == issuer + "/keys" and shown["introspection_endpoint"] is None


def test_discover_refuses_a_document_naming_another_issuer(cli, docs):
    issuer = docs.base + "/as"
    docs.routes["/as/.well-known/openid-configuration"] = {"issuer": docs.base + "/evil", "jwks_uri": issuer + "/k"}
    refused(cli, "issuer", "add", issuer, "--discover", "--source", SOURCE, mentions=("names issuer", "/evil"))
    docs.routes["/as/.well-known/openid-configuration"] = {"issuer": issuer + "/", "jwks_uri": issuer + "/k"}
    refused(cli, "issuer", "add", issuer, "--discover", "--source", SOURCE, mentions="names issuer")


def test_discover_refuses_a_document_without_a_usable_jwks_uri(cli, docs):
    issuer = docs.base + "/as"
    docs.routes["/as/.well-known/openid-configuration"] = {"issuer": issuer}
    refused(cli, "issuer", "add", issuer, "--discover", "--source", SOURCE, mentions="jwks_uri")
    docs.routes["/as/.well-known/openid-configuration"] = {"issuer": issuer, "jwks_uri": "/relative/jwks"}
    refused(cli, "issuer", "add", issuer, "--discover", "--source", SOURCE, mentions="jwks")


def test_discover_refuses_when_no_document_is_found(cli, docs, ehr):
    refused(cli, "issuer", "add", docs.base + "/nothing-here", "--discover", "--source", SOURCE,
            mentions="no discovery document")
    refused(cli, "issuer", "add", ehr.issuer + "x", "--discover", "--source", SOURCE)
    refused(cli, "issuer", "add", f"http://127.0.0.1:{free_port()}/as", "--discover", "--source", SOURCE,
            mentions="no discovery document")


# -- entry points ----------------------------------------------------------------------
def _run(cmd, extra_env=None):
    env = {**os.environ, **(extra_env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd="/")


def _console_script():
    return str(Path(sys.executable).parent / "token-exchange")


def test_console_script_and_python_m_both_show_help():
    for cmd in ([sys.executable, "-m", "token_exchange", "--help"], [_console_script(), "--help"]):
        r = _run(cmd)
        assert r.returncode == 0, (cmd, r.stderr)
        assert r.stderr == ""
        for group in ("db", "serve", "issuer", "target", "client", "trust", "link", "keys", "audit"):
            assert f"  {group} " in r.stdout, (cmd, group)


def test_a_bare_group_shows_its_commands(cli):
    r = cli("issuer", check=False)
    for command in ("add", "list", "show", "remove"):
        assert f"  {command} " in r.output or f"  {command}\n" in r.output, r.output
    assert "error:" not in r.output


def test_console_script_failures_are_one_line(tmp_path):
    env = {"TOKEN_EXCHANGE_DATABASE_URL": f"sqlite:///{tmp_path}/te.db"}
    CLI(env)("db", "upgrade")
    for args, code, mentions in [(["client", "show", "ghost"], 1, "no client"),
                                 (["audit", "list", "--outcome", "x"], 2, "--outcome")]:
        r = _run([_console_script(), *args], env)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and mentions in lines[0], (args, r.stderr)
        assert r.stdout == ""


def test_an_unreachable_database_is_one_line_not_a_traceback():
    r = _run([sys.executable, "-m", "token_exchange", "client", "list"],
             {"TOKEN_EXCHANGE_DATABASE_URL": f"postgresql://te@127.0.0.1:{free_port()}/te"})
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the database is unreachable"), r.stderr


# -- issue 26, finding 8: a failure reaching outside is one line too -----------------------
SSN = "urn:oid:2.16.840.1.113883.4.1"


def _one_error_line(r, args):
    """Exactly one `error:` line on stderr, nothing on stdout, exit 1: no log line
    before it (Python's last-resort handler prints the library's warnings), no traceback."""
    assert r.returncode == 1, (args, r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
    assert r.stdout == "", (args, r.stdout)
    return lines[0]


@pytest.fixture
def unreachable_target(world, ehr):
    """A target set up for matching whose address nothing listens on."""
    gone = f"http://127.0.0.1:{free_port()}/fhir"
    world("issuer", "update", ehr.issuer, "--identifier-system", SSN)
    world("target", "add", gone, "--name", "gone", "--match-identifier", SSN)
    return gone


def test_link_match_against_an_unreachable_target_is_one_error_line_naming_the_target(unreachable_target, env):
    args = ["link", "match", "--source", SOURCE, "--patient", "a-123", "--target", unreachable_target,
            "--identifier", f"{SSN}|1"]
    line = _one_error_line(_run([_console_script(), *args], env), args)
    assert line.startswith(f"error: could not ask the target at {unreachable_target}"), line
    assert "nothing stored" in line and "reachable" in line, line


def test_issuer_add_discover_against_a_down_or_unreachable_ehr_is_one_error_line(world, ehr, env):
    gone = f"http://127.0.0.1:{free_port()}/as"
    ehr.down = True  # every endpoint answers 503
    for issuer in (gone, ehr.issuer + "-new"):
        args = ["issuer", "add", issuer, "--discover", "--source", SOURCE]
        line = _one_error_line(_run([_console_script(), *args], env), args)
        assert f"no discovery document found for {issuer}" in line, line
        assert "--jwks-uri" in line, line  # what to do instead


def test_every_failing_command_prints_exactly_one_error_line_and_no_log_line(unreachable_target, world, ehr, env):
    gone = f"http://127.0.0.1:{free_port()}"
    world("issuer", "update", ehr.issuer, "--source", SOURCE, "--fhir-client-id", "te-at-ehr",
          "--token-endpoint", gone + "/token")  # the EHR's Backend Services token endpoint: unreachable
    ehr.down = True
    sweep = [
        ["link", "match", "--source", SOURCE, "--patient", "a-123", "--target", "gone", "--identifier", f"{SSN}|1"],
        ["link", "match", "--source", SOURCE, "--patient", "a-123", "--target", "gone"],  # reads at the EHR first
        ["issuer", "add", gone + "/as", "--discover", "--source", SOURCE],
        ["issuer", "update", ehr.issuer, "--discover"],
        ["client", "show", "ghost"],
        ["trust", "add", "--client", "ghost", "--issuer", ehr.issuer, "--target", TARGET, "--scopes", "patient/*.rs",
         "--upstream-client-id", UPSTREAM],
    ]
    for args in sweep:
        _one_error_line(_run([_console_script(), *args], env), args)
    # issuer check's answer is its report on stdout: nothing on stderr beside it
    r = _run([_console_script(), "issuer", "check", gone + "/as"], env)
    assert r.returncode == 1 and r.stderr == "" and "FAIL" in r.stdout, (r.stdout, r.stderr)
