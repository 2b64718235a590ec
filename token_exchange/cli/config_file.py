"""The configuration file of `config export|apply`: its fields, its JSON Schema, reading
it (JSON or YAML) and writing it.

Each field is an option of the noun's `add` command, under the option's own name
(the table FIELDS says which); the schema checks the file's shape (known keys, JSON
types) and takes each option's range or choices from the click option itself, so a
rule lives once. What a value must look like beyond its type (a URL, a scope, an
algorithm) is checked by the noun's own function in cli/issuers.py, targets.py,
clients.py and trusts.py, as for the commands.
"""
from __future__ import annotations

import json
import re

import click

from .common import Fail, printable

VERSION = 1
MAX_FILE_BYTES = 16 * 1024 * 1024  # a configuration file, not a data dump

# noun -> [(field in the file, option key of the noun's functions)]; the first field
# is the object's key (the command's argument), secrets are `*_env` fields.
FIELDS = {
    "issuers": [("url", None), ("jwks_uri", "jwks_uri"), ("sources", "sources"), ("audiences", "audiences"),
                ("algs", "algs"), ("patient_claim", "patient_claim"), ("source_claim", "source_claim"),
                ("identifier_systems", "identifier_systems"), ("identifier_claim", "identifier_claim"),
                ("user_identifier_systems", "user_identifier_systems"),
                ("user_identifier_claim", "user_identifier_claim"),
                ("introspection_endpoint", "introspection_endpoint"),
                ("introspection_client_id", "introspection_client_id"),
                ("introspection_secret_env", "introspection_secret_env"),
                ("fhir_client_id", "fhir_client_id"), ("fhir_scope", "fhir_scope"),
                ("token_endpoint", "token_endpoint"), ("authorization_endpoint", "authorization_endpoint"),
                ("login_client_id", "login_client_id"), ("login_secret_env", "login_secret_env")],
    "targets": [("base_url", None), ("name", "name"), ("max_ttl", "max_ttl"),
                ("introspection_secret_env", "introspection_secret_env"),
                ("match_identifiers", "match_identifiers"), ("match_ttl_days", "match_ttl"),
                ("users", "users"), ("user_match_identifiers", "user_match_identifiers")],
    "clients": [("client_id", None), ("name", "name"), ("redirect_uris", "redirect_uris"),
                ("secret_env", "secret_env"), ("jwks", "jwks"), ("jwks_uri", "jwks_uri"),
                ("require_dpop", "require_dpop"), ("disabled", None)],
    "trusts": [("client", None), ("issuer", None), ("target", None), ("scopes", "scope_text"),
               ("upstream_client_id", "upstream_client_id"), ("max_ttl", "max_ttl"),
               ("allow_id_token", "allow_id_token"), ("allow_jwt_grant", "allow_jwt_grant"),
               ("consent", "consent"), ("consent_max_days", "consent_max_days"),
               ("consent_signer", "consent_signer"), ("require_dpop", "require_dpop")],
}
REQUIRED = {"issuers": ["url", "jwks_uri", "sources"], "targets": ["base_url"], "clients": ["client_id"],
            "trusts": ["client", "issuer", "target", "scopes", "upstream_client_id"]}
LISTS = {"sources", "audiences", "algs", "identifier_systems", "match_identifiers", "redirect_uris",
         "user_identifier_systems", "user_match_identifiers"}
NOT_NULL = {"patient_claim", "source_claim", "identifier_claim", "user_identifier_claim", "users",
            "match_ttl_days", "allow_id_token",
            "allow_jwt_grant", "consent", "consent_max_days", "consent_signer", "require_dpop"}
SECRETS = {"introspection_secret_env", "login_secret_env", "secret_env"}


def add_command(noun: str) -> click.Command:
    """The noun's `add` command (its options are the fields' one definition)."""
    from .common import cli
    return cli.commands[noun[:-1]].commands["add"]


def option(noun: str, key: str) -> click.Parameter | None:
    return next((p for p in add_command(noun).params if p.name == key), None)


def default(noun: str, field: str):
    """The value a field takes when the file leaves it out: the `add` command's default."""
    key = dict(FIELDS[noun])[field]
    p = option(noun, key) if key else None
    value = None if p is None or p.multiple else p.default
    if not isinstance(value, (str, int, bool)):
        value = None  # no default (click 8.3 marks it with a sentinel)
    if field == "disabled":
        return False  # `client disable|enable`, not an option of `client add`
    if field == "algs":
        return value.split(",")
    if field in LISTS:
        return []
    return value


def _field_schema(noun: str, field: str, key: str | None) -> dict:
    if field in LISTS:
        return {"type": "array", "items": {"type": "string"}}
    if field == "jwks":
        return {"type": ["object", "null"]}
    if field == "disabled":
        return {"type": "boolean"}
    p = option(noun, key) if key else None
    t = p.type if p is not None else None
    if isinstance(t, click.Choice):
        return {"enum": list(t.choices) + ([] if field in NOT_NULL else [None])}
    nullable = [] if field in NOT_NULL or key is None or field in REQUIRED[noun] else ["null"]
    if isinstance(t, click.IntRange):
        s = {"type": ["integer", *nullable]}
        if t.min is not None:
            s["exclusiveMinimum" if t.min_open else "minimum"] = t.min
        if t.max is not None:
            s["exclusiveMaximum" if t.max_open else "maximum"] = t.max
        return s
    if p is not None and p.is_flag:
        return {"type": ["boolean", *nullable]}
    return {"type": ["string", *nullable]}


def schema() -> dict:
    objects = {noun: {"type": "object", "additionalProperties": False, "required": REQUIRED[noun],
                      "properties": {f: _field_schema(noun, f, k) for f, k in fields}}
               for noun, fields in FIELDS.items()}
    props = {noun: {"type": "array", "items": obj} for noun, obj in objects.items()}
    props["version"] = {"const": VERSION}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "additionalProperties": False, "properties": props}


def path_text(parts) -> str:
    """A place in the file: trusts[2].scopes."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(the file)"


def _describe(error) -> tuple[str, str]:
    """(path, what is wrong) of a jsonschema error, in the words of this CLI."""
    where = list(error.absolute_path)
    v = error.validator
    if v == "additionalProperties":
        extra = sorted(str(k) for k in set(error.instance) - set(error.schema.get("properties", {})))
        known = ", ".join(error.schema.get("properties", {}))
        return path_text(where + [extra[0]]), f"unknown key (known: {known})"
    if v == "required":
        missing = re.match(r"'(.*)' is a required property", error.message)
        return path_text(where + [missing.group(1) if missing else "?"]), "missing"
    if where and str(where[-1]).endswith("_env") and v in ("type", "enum"):
        return path_text(where), "must be the NAME of an environment variable (a string), or null"  # never echo it
    if v == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        words = {"string": "a string", "integer": "an integer", "boolean": "true or false", "array": "a list",
                 "object": "an object", "null": "null"}
        return path_text(where), (f"must be {' or '.join(words.get(w, w) for w in wanted)}, "
                                  f"not {printable(json.dumps(error.instance, default=str))[:80]}")
    if v == "enum":
        return path_text(where), (f"must be one of {', '.join(json.dumps(c) for c in error.validator_value)}, "
                                  f"not {printable(json.dumps(error.instance, default=str))[:80]}")
    if v in ("minimum", "maximum"):
        return path_text(where), (f"must be at {'least' if v == 'minimum' else 'most'} {error.validator_value}, "
                                  f"not {printable(json.dumps(error.instance))[:80]}")
    if v == "const":
        return path_text(where), f"must be {json.dumps(error.validator_value)}"
    return path_text(where), printable(error.message)[:200]


def _order(error):
    return [(0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in error.absolute_path]


def validate(doc) -> None:
    """The file's shape against the schema: the first problem (in file order) as one Fail
    naming its path."""
    import jsonschema
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(doc), key=_order)
    if errors:
        where, what = _describe(errors[0])
        raise Fail(f"{where}: {what}")


def read(file) -> dict:
    """The file (a path, or '-' for stdin), JSON or YAML (safe_load), as plain data."""
    import yaml
    try:
        data = file.read(MAX_FILE_BYTES + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise Fail(f"{printable(file.name)}: cannot read it ({type(e).__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise Fail(f"{printable(file.name)}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    try:
        doc = json.loads(data) if data.lstrip().startswith("{") else yaml.safe_load(data)
    except json.JSONDecodeError as e:
        raise Fail(f"{printable(file.name)}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise Fail(f"{printable(file.name)}: not valid YAML ({line}{getattr(e, 'problem', None) or 'syntax'})") \
            from None
    except RecursionError:
        raise Fail(f"{printable(file.name)}: nested too deeply") from None
    if doc is None:
        doc = {}
    validate(doc)
    return doc


def write(doc: dict, fmt: str) -> str:
    if fmt == "yaml":
        import yaml
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
