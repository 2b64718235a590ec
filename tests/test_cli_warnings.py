"""Warnings (issue 25, item 10): a change that is allowed but will not do what it looks
like it does is made, and says so in one line starting `warning:` on stderr."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

from sqlalchemy import text

from fakes import SOURCE, TARGET, TARGET2, UPSTREAM
from token_exchange.db import make_engine

ELSEWHERE = "https://fhir.elsewhere.example/fhir"


def as_json(cli, *args):
    return json.loads(cli(*args, "--json").stdout)


def one_warning(result) -> str:
    lines = result.stderr.splitlines()
    assert result.exit_code == 0 and len(lines) == 1 and lines[0].startswith("warning: "), result.stderr
    return lines[0]


# -- consent required where nobody can sign in ---------------------------------------------------
def test_trust_update_consent_required_for_an_issuer_without_a_login_client_warns_and_is_made(world, ehr):
    r = world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET,
              "--consent", "required")
    line = one_warning(r)
    assert ehr.issuer in line and "--login-client-id" in line and r.stdout == "trust updated\n"
    (row,) = [t for t in as_json(world, "trust", "list") if t["target"] == TARGET]
    assert row["consent"] == "required"


def test_trust_add_consent_required_for_an_issuer_without_a_login_client_warns_and_is_made(world, ehr):
    r = world("trust", "add", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET2,
              "--scopes", "patient/*.rs", "--upstream-client-id", UPSTREAM, "--consent", "required")
    assert "--login-client-id" in one_warning(r)
    assert [t["consent"] for t in as_json(world, "trust", "list") if t["target"] == TARGET2] == ["required"]


def test_trust_consent_required_for_an_issuer_with_a_login_client_does_not_warn(world, ehr):
    world("issuer", "update", ehr.issuer, "--login-client-id", "te-login", "--login-secret-env", "EHR_SECRET")
    r = world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET,
              "--consent", "required")
    assert r.exit_code == 0 and r.stderr == ""
    r = world("trust", "update", "--client", "vendor", "--issuer", ehr.issuer, "--target", TARGET, "--consent", "none")
    assert r.stderr == ""


# -- links for a source no issuer vouches for ------------------------------------------------------
def test_link_add_for_a_source_no_issuer_vouches_for_warns_and_is_made(world):
    r = world("link", "add", "--source", ELSEWHERE, "--patient", "p-1", "--target", TARGET,
              "--target-patient", "q-1")
    line = one_warning(r)
    assert ELSEWHERE in line and "--source" in line and r.stdout == "link added\n"
    assert [ln["target_patient"] for ln in as_json(world, "link", "list") if ln["source"] == ELSEWHERE] == ["q-1"]
    r = world("link", "add", "--source", SOURCE, "--patient", "p-2", "--target", TARGET, "--target-patient", "q-2")
    assert r.stderr == ""


def test_link_import_of_sources_no_issuer_vouches_for_warns_once_and_imports(world, tmp_path):
    f = tmp_path / "links.csv"
    f.write_text("source,patient,target,target_patient\n"
                 f"{ELSEWHERE},p-1,{TARGET},q-1\n{ELSEWHERE},p-2,{TARGET},q-2\n{SOURCE},p-3,{TARGET},q-3\n")
    r = world("link", "import", str(f))
    line = one_warning(r)
    assert ELSEWHERE in line and "2 link" in line and SOURCE not in line
    assert r.stdout == "imported 3 links\n"


# -- keys rotate before every cached /jwks can hold the staged key ---------------------------------
def jwks_max_age(http):
    cc = http.get("/jwks").headers["Cache-Control"]
    return int(re.search(r"max-age=(\d+)", cc).group(1))


def test_keys_rotate_within_the_jwks_cache_lifetime_of_keys_stage_says_when_the_key_is_safe(world, http):
    max_age = jwks_max_age(http)
    world("keys", "stage")
    (staged,) = [k for k in as_json(world, "keys", "list") if k["state"] == "staged"]
    r = world("keys", "rotate")
    line = one_warning(r)
    assert staged["kid"] in line and f"{max_age} s" in line
    safe = datetime.fromisoformat(re.search(r"safe to use from (\S+?Z)", line).group(1).replace("Z", "+00:00"))
    created = datetime.fromisoformat(staged["created"].replace("Z", "+00:00"))
    assert timedelta(0) <= safe - created - timedelta(seconds=max_age) <= timedelta(seconds=2)
    assert r.stdout == f"active key is now {staged['kid']} (RS256)\n"  # the rotation is made


def test_keys_rotate_without_a_staged_key_warns_too(world):
    r = world("keys", "rotate")
    assert "safe to use from" in one_warning(r)


def test_keys_rotate_past_the_jwks_cache_lifetime_of_keys_stage_does_not_warn(world, env):
    world("keys", "stage")
    engine = make_engine(env["TOKEN_EXCHANGE_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(text("UPDATE signing_key SET created = :t WHERE state = 'staged'"),
                     {"t": datetime.now(timezone.utc) - timedelta(hours=1)})
    engine.dispose()
    r = world("keys", "rotate")
    assert r.exit_code == 0 and r.stderr == ""

