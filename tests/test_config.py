"""Configuration as code (`config export|apply`), through the real CLI: the export
applied to a fresh database reproduces itself; apply is idempotent, all or nothing,
audited, prunes only with --yes; errors name their place in the file; secrets are
never written; running instances use what was applied."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import (CLI, EHR_INTROSPECTION_SECRET, OTHER_SECRET, TARGET2_SECRET, TARGET_SECRET,
                      VENDOR_SECRET, base_env)
from fakes import TARGET, UPSTREAM

SECRETS = (VENDOR_SECRET, OTHER_SECRET, TARGET_SECRET, TARGET2_SECRET, EHR_INTROSPECTION_SECRET)
NEW_ISSUER = "https://ehr.new.example/oauth2"


# -- helpers ------------------------------------------------------------------------
def export(cli, fmt="json"):
    out = cli("config", "export", "--format", fmt).stdout
    return out, (json.loads(out) if fmt == "json" else yaml.safe_load(out))


def secret_variables(doc) -> dict:
    """The export's placeholder variables, set to the world's secrets (what an operator does)."""
    by_target = {"hospital-b": TARGET_SECRET, "clinic-c": TARGET2_SECRET}
    by_client = {"vendor": VENDOR_SECRET, "other": OTHER_SECRET}
    env = {}
    for i in doc["issuers"]:
        if i["introspection_secret_env"]:
            env[i["introspection_secret_env"]] = EHR_INTROSPECTION_SECRET
    for t in doc["targets"]:
        if t["introspection_secret_env"]:
            env[t["introspection_secret_env"]] = by_target[t["name"]]
    for c in doc["clients"]:
        if c.get("secret_env"):
            env[c["secret_env"]] = by_client[c["client_id"]]
    return env


def with_secrets(cli, doc) -> CLI:
    return CLI(dict(cli.env, **secret_variables(doc)))


def apply(cli, doc, *args, check=True):
    return cli("config", "apply", "-", *args, input=json.dumps(doc), check=check)


def admin_events(cli):
    return json.loads(cli("audit", "list", "--admin", "--json").stdout)


def refused(cli, doc, *args):
    """A refused apply: one `error:` line, nothing on stdout, nothing changed."""
    before = (export(cli)[0], admin_events(cli))
    r = apply(cli, doc, *args, check=False)
    assert r.exit_code != 0 and r.stdout == "", (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert (export(cli)[0], admin_events(cli)) == before, "a refused apply changed something"
    return lines[0]


def fresh_cli(tmp_path) -> CLI:
    c = CLI(base_env(f"sqlite:///{tmp_path}/fresh.db"))
    c("db", "upgrade")
    return c


# -- round trip ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_export_applied_to_a_fresh_database_reproduces_the_export(world, tmp_path, fmt):
    text, doc = export(world, fmt)
    assert [i["url"] for i in doc["issuers"]] and len(doc["trusts"]) == 1
    fresh = with_secrets(fresh_cli(tmp_path), doc)
    (tmp_path / f"config.{fmt}").write_text(text)
    r = fresh("config", "apply", str(tmp_path / f"config.{fmt}"))
    assert r.stdout.splitlines()[0].startswith("+ issuer ")
    assert export(fresh, fmt)[0] == text


def test_export_writes_every_option_of_the_add_commands(world):
    world("trust", "update", "--client", "vendor", "--issuer", export(world)[1]["issuers"][0]["url"],
          "--target", TARGET, "--max-ttl", "120", "--allow-jwt-grant", "--consent-max-days", "30")
    trust = export(world)[1]["trusts"][0]
    assert trust == {**trust, "max_ttl": 120, "allow_jwt_grant": True, "consent_max_days": 30,
                     "upstream_client_id": UPSTREAM, "scopes": "patient/*.rs user/*.rs"}
    issuer = export(world)[1]["issuers"][0]
    assert {"jwks_uri", "sources", "algs", "introspection_endpoint", "introspection_secret_env",
            "login_secret_env", "identifier_systems", "fhir_client_id"} <= set(issuer)


def test_export_never_writes_a_secret_only_the_variable_to_read_it_from(world):
    for fmt in ("json", "yaml"):
        text, doc = export(world, fmt)
        assert not any(s in text for s in SECRETS)
        assert doc["clients"][0]["secret_env"] and doc["targets"][0]["introspection_secret_env"]
        assert doc["issuers"][0]["introspection_secret_env"]


def test_a_client_with_public_keys_is_exported_with_its_jwks_inline_or_by_uri(world, tmp_path):
    from fakes import new_key
    import jwt
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(new_key().public_key()))
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [dict(jwk, kid="k1", use="sig")]}))
    world("client", "add", "pkj", "--jwks-file", str(tmp_path / "keys.json"))
    world("client", "add", "pku", "--jwks-uri", "https://vendor.example/jwks")
    clients = {c["client_id"]: c for c in export(world)[1]["clients"]}
    assert clients["pkj"]["jwks"]["keys"][0]["kid"] == "k1" and "secret_env" not in clients["pkj"]
    assert clients["pku"]["jwks_uri"] == "https://vendor.example/jwks"
    assert apply(with_secrets(world, export(world)[1]), export(world)[1]).stdout == "no changes\n"


# -- apply --------------------------------------------------------------------------
def test_apply_twice_says_no_changes(world):
    _, doc = export(world)
    c = with_secrets(world, doc)
    doc["trusts"][0]["scopes"] = "patient/*.rs"
    first = apply(c, doc).stdout.splitlines()
    assert first == [f"~ trust vendor/{doc['trusts'][0]['issuer']}/{TARGET}: scopes "
                     f"\"patient/*.rs user/*.rs\" → \"patient/*.rs\""]
    assert apply(c, doc).stdout == "no changes\n"


def test_apply_audits_each_change_as_an_admin_event(world):
    _, doc = export(world)
    c = with_secrets(world, doc)
    doc["targets"][0]["max_ttl"] = 60
    next(x for x in doc["clients"] if x["client_id"] == "other")["name"] = "Other App"
    before = len(admin_events(c))
    lines = apply(c, doc).stdout.splitlines()
    events = admin_events(c)
    assert len(lines) == 2 and len(events) == before + 2
    assert sorted((e["action"], e["detail"]) for e in events if e["detail"].startswith("config apply")) == [
        ("client.update", 'config apply: other: name null → "Other App"'),
        ("target.update", f'config apply: {TARGET}: max_ttl null → 60')]


def test_dry_run_prints_the_same_lines_and_changes_nothing(world):
    _, doc = export(world)
    c = with_secrets(world, doc)
    doc["trusts"][0]["allow_id_token"] = True
    doc["clients"].append({"client_id": "new", "jwks_uri": "https://new.example/jwks"})
    before = (export(c)[0], admin_events(c))
    dry = apply(c, doc, "--dry-run").stdout
    assert (export(c)[0], admin_events(c)) == before
    assert dry == apply(c, doc).stdout and "+ client new" in dry and "allow_id_token false → true" in dry


def test_without_prune_objects_not_in_the_file_are_left_alone(world):
    _, doc = export(world)
    doc["clients"] = [c for c in doc["clients"] if c["client_id"] != "other"]
    assert apply(with_secrets(world, doc), doc).stdout == "no changes\n"
    assert "other" in [c["client_id"] for c in export(world)[1]["clients"]]


def test_prune_without_yes_refuses_in_one_line_saying_how_many(world):
    _, doc = export(world)
    doc["clients"] = [c for c in doc["clients"] if c["client_id"] != "other"]
    doc["targets"] = [t for t in doc["targets"] if t["name"] != "clinic-c"]
    line = refused(with_secrets(world, doc), doc, "--prune")
    assert "would remove 2" in line and "--yes" in line


def test_prune_with_yes_removes_what_the_file_does_not_name_and_audits_it(world):
    _, doc = export(world)
    c = with_secrets(world, doc)
    doc["clients"] = [x for x in doc["clients"] if x["client_id"] != "other"]
    out = apply(c, doc, "--prune", "--yes").stdout.splitlines()
    assert out == ["- client other"]
    assert [x["client_id"] for x in export(c)[1]["clients"]] == ["vendor"]
    assert [(e["action"], e["detail"]) for e in admin_events(c) if e["action"] == "client.remove"] == [
        ("client.remove", "config apply: other")]


def test_prune_revokes_the_tokens_minted_under_the_trusts_and_clients_it_removes(world, http, exchange):
    from test_revocation import active
    r = exchange()
    assert r.status_code == 200, r.get_json()
    _, doc = export(world)
    doc["trusts"] = []
    assert apply(with_secrets(world, doc), doc, "--prune", "--yes").stdout.startswith("- trust vendor/")
    assert not active(http, r.get_json()["access_token"])


def test_a_disabled_client_is_exported_and_applied_as_disabled(world, http, exchange, tmp_path):
    from test_revocation import active
    from test_token import error_of
    token = exchange().get_json()["access_token"]
    _, doc = export(world)
    assert {c["client_id"]: c["disabled"] for c in doc["clients"]} == {"other": False, "vendor": False}
    vendor = next(c for c in doc["clients"] if c["client_id"] == "vendor")
    vendor["disabled"] = True
    c = with_secrets(world, doc)
    assert apply(c, doc).stdout.splitlines() == ["~ client vendor: disabled false → true"]
    error_of(exchange(), 401, "invalid_client")
    assert not active(http, token)  # as `client disable`: its tokens revoked
    assert export(world)[1]["clients"][1]["disabled"] is True
    fresh = with_secrets(fresh_cli(tmp_path), doc)  # a fresh database takes it as it is
    assert "+ client vendor (disabled)" in apply(fresh, doc).stdout.splitlines()
    assert export(fresh)[0] == export(world)[0]
    vendor["disabled"] = False
    assert apply(c, doc).stdout.splitlines() == ["~ client vendor: disabled true → false"]
    assert exchange().status_code == 200


def test_one_transaction_a_file_whose_last_trust_is_invalid_changes_nothing(world):
    _, doc = export(world)
    c = with_secrets(world, doc)
    issuer = doc["issuers"][0]["url"]
    doc["issuers"].append({"url": NEW_ISSUER, "jwks_uri": NEW_ISSUER + "/jwks",
                           "sources": ["https://fhir.new.example/fhir"]})
    doc["trusts"][0]["scopes"] = "patient/*.rs"
    doc["trusts"].append({"client": "other", "issuer": issuer, "target": TARGET, "scopes": "patient/*.rs",
                          "upstream_client_id": UPSTREAM})
    doc["trusts"].append({"client": "other", "issuer": NEW_ISSUER, "target": TARGET, "scopes": "openid",
                          "upstream_client_id": UPSTREAM})
    line = refused(c, doc)
    assert line.startswith("error: trusts[2].scopes must list SMART resource scopes only")


def _world_doc(world):
    _, doc = export(world)
    return with_secrets(world, doc), doc


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["trusts"][0].update(scope="patient/*.rs"), "error: trusts[0].scope: unknown key"),
    (lambda d: d["trusts"][0].update(max_ttl="300"), "error: trusts[0].max_ttl: must be an integer or null"),
    (lambda d: d["issuers"][0].update(sources="https://x.example"), "error: issuers[0].sources: must be a list"),
    (lambda d: d.update(links=[]), "error: links: unknown key"),
    (lambda d: d["trusts"].append(dict(d["trusts"][0], client="nobody")),
     'error: trusts[1].client: no client "nobody" in the file or the database'),
    (lambda d: d["trusts"].append(dict(d["trusts"][0], target="https://nowhere.example/fhir")),
     'error: trusts[1].target: no target "https://nowhere.example/fhir"'),
    (lambda d: d["trusts"][0].pop("scopes"), "error: trusts[0].scopes: missing"),
    (lambda d: d["trusts"][0].update(consent="maybe"), 'error: trusts[0].consent: must be one of "none", '
                                                       '"required"'),
], ids=["unknown-key", "wrong-type", "wrong-type-list", "links-stay-in-link-import", "dangling-client",
        "dangling-target", "missing-key", "not-a-choice"])
def test_a_file_error_is_one_line_naming_its_path(world, change, expected):
    c, doc = _world_doc(world)
    change(doc)
    assert refused(c, doc).startswith(expected)


def test_a_missing_secret_variable_is_one_line_naming_the_path_not_repeating_the_value(world):
    """Operators' additions: a failure names the option (here its path), never the value given
    to it (a secret typed there by mistake can look like a variable's name)."""
    _, doc = export(world)
    env = secret_variables(doc)
    var = doc["clients"][0]["secret_env"]
    env.pop(var)
    line = refused(CLI(dict(world.env, **env)), doc)
    assert line.startswith("error: clients[0].secret_env: ") and "not set" in line and var not in line


def test_a_secret_given_by_mistake_in_an_env_field_is_never_repeated(world):
    c, doc = _world_doc(world)
    doc["clients"][0]["secret_env"] = OTHER_SECRET
    line = refused(c, doc)
    assert line.startswith("error: clients[0].secret_env takes the NAME") and OTHER_SECRET not in line
    doc["clients"][0]["secret_env"] = 1234567890123
    line = refused(c, doc)
    assert line.startswith("error: clients[0].secret_env: must be the NAME") and "1234567890123" not in line


def test_apply_refuses_exactly_what_the_commands_refuse(world):
    c, doc = _world_doc(world)
    issuer = doc["issuers"][0]["url"]
    doc["issuers"][0]["algs"] = ["HS256"]
    assert refused(c, doc).startswith("error: issuers[0].algs must list asymmetric algorithms")
    r = world("issuer", "update", issuer, "--algs", "HS256", check=False)
    assert r.stderr.startswith("error: --algs must list asymmetric algorithms")
    c, doc = _world_doc(world)
    doc["clients"][0]["redirect_uris"] = ["http://app.example/cb"]
    assert "clients[0].redirect_uris must use https" in refused(c, doc)
    assert "--redirect-uri must use https" in world("client", "update", "vendor", "--redirect-uri",
                                                     "http://app.example/cb", check=False).stderr


def test_running_instances_exchange_under_the_applied_trust(world, http, exchange):
    from conftest import OTHER_SECRET as SECRET
    assert exchange(auth=("other", SECRET)).status_code == 400
    c, doc = _world_doc(world)
    doc["trusts"].append(dict(doc["trusts"][0], client="other", scopes="patient/Observation.rs"))
    assert apply(c, doc).stdout.startswith("+ trust other/")
    r = exchange(auth=("other", SECRET))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["scope"] == "patient/Observation.rs"
