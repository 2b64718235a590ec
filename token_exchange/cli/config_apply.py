"""`config apply`: make the database's issuers, targets, clients and trusts match a file.

A ``Plan`` works inside one ``AdminChange`` (one transaction): with --prune it first
removes what the file does not name (trusts, then clients, targets and issuers),
then adds or changes each object in file order (issuers, targets, clients, trusts),
through the same functions as `issuer|target|client|trust add|update`, so it refuses
exactly what they refuse. Each change is one printed line and one admin event; the
caller commits them all (one generation bump) or, on a dry run or any failure, none.

Secrets are never in the file: each `*_env` field names the environment variable
that holds it, read now and compared with what is stored (a hash, or a sealed
value), so a secret that did not change is no change.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager

from ..sealing import SealError, check_secret, unseal
from . import clients, issuers, targets, trusts
from .common import Fail, printable, secret_from_env
from .tokens import revoke_on_remove
from .config_file import FIELDS, LISTS, default

# (noun, field) -> (what the commands call the secret, column(s) it is stored in)
_SECRET = {("issuers", "introspection_secret_env"): ("introspection secret", "introspection_secret"),
           ("issuers", "login_secret_env"): ("login client secret", "login_secret"),
           ("targets", "introspection_secret_env"): ("target secret", "secret_hash"),
           ("clients", "secret_env"): ("client secret", "secret_hash")}
_CREDENTIALS = ("secret_env", "jwks", "jwks_uri")


def fields_of(noun: str, row, keys=None) -> dict:
    """A stored object as the file writes it, secrets aside (``keys``: a trust's
    client id, issuer URL and target base URL)."""
    if noun == "issuers":
        return {"url": row.url, "jwks_uri": row.jwks_uri, "sources": row.sources or [],
                "audiences": row.audiences or [], "algs": row.algs or [], "patient_claim": row.patient_claim,
                "source_claim": row.source_claim, "identifier_systems": row.identifier_systems or [],
                "identifier_claim": row.identifier_claim,
                "user_identifier_systems": row.user_identifier_systems or [],
                "user_identifier_claim": row.user_identifier_claim, "introspection_endpoint": row.introspection_endpoint,
                "introspection_client_id": row.introspection_client_id, "fhir_client_id": row.fhir_client_id,
                "fhir_scope": row.fhir_scope, "token_endpoint": row.token_endpoint,
                "authorization_endpoint": row.authorization_endpoint, "login_client_id": row.login_client_id}
    if noun == "targets":
        return {"base_url": row.base_url, "name": row.name, "max_ttl": row.max_ttl,
                "match_identifiers": row.match_identifiers or [], "match_ttl_days": row.match_ttl_days,
                "users": row.users, "user_match_identifiers": row.user_match_identifiers or []}
    if noun == "clients":
        return {"client_id": row.client_id, "name": row.name, "redirect_uris": row.redirect_uris or [],
                "jwks": row.jwks if row.auth_method == "private_key_jwt" else None, "jwks_uri": row.jwks_uri,
                "require_dpop": bool(row.require_dpop), "disabled": bool(row.disabled)}
    client_id, issuer_url, base_url = keys
    return {"client": client_id, "issuer": issuer_url, "target": base_url, "scopes": row.scopes,
            "upstream_client_id": row.upstream_client_id, "max_ttl": row.max_ttl,
            "allow_id_token": bool(row.allow_id_token), "allow_jwt_grant": bool(row.allow_jwt_grant),
            "consent": row.consent, "consent_max_days": row.consent_max_days,
            "consent_signer": row.consent_signer, "require_dpop": bool(row.require_dpop)}


def show(value) -> str:
    return printable(json.dumps(value, ensure_ascii=False))


class Plan:
    def __init__(self, ctx, change, doc: dict, prune: bool):
        self.ctx, self.change, self.prune = ctx, change, prune
        self.entries = {noun: doc.get(noun) or [] for noun in FIELDS}
        self.lines: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.removed = 0

    # -- where a failure is in the file -------------------------------------------------
    @staticmethod
    def namer(noun: str, i: int):
        fields = {key: field for field, key in FIELDS[noun] if key}
        return lambda key: f"{noun}[{i}].{fields.get(key, key)}"

    @contextmanager
    def at(self, noun: str, i: int, entry: dict):
        """A failure of the commands' checks, named by its place in the file: the field
        when the message names it or its variable, else the object."""
        try:
            yield
        except Fail as e:
            msg, where = e.format_message(), f"{noun}[{i}]"
            if where + "." in msg:
                raise
            for field in _CREDENTIALS + ("introspection_secret_env", "login_secret_env"):
                var = entry.get(field)
                if field.endswith("_env") and isinstance(var, str) and re.search(rf"\b{re.escape(var)}\b", msg):
                    raise Fail(f"{where}.{field}: {msg}") from None
            raise Fail(f"{where}: {msg}") from None

    def say(self, sign: str, noun: str, text: str):
        self.lines.append(f"{sign} {noun} {text}")
        verb = {"+": "add", "~": "update", "-": "remove"}[sign]
        self.events.append((f"{noun}.{verb}", f"config apply: {text}"))

    # -- the file's objects -----------------------------------------------------------------
    def desired(self, noun: str, entry: dict) -> dict:
        """Every field of an object: the file's, else the `add` command's default."""
        out = {}
        for field, _ in FIELDS[noun]:
            value = entry[field] if field in entry else default(noun, field)
            if field in LISTS:
                value = list(dict.fromkeys(v.strip() if field == "algs" else v for v in value))
            elif isinstance(value, float):
                value = int(value)  # JSON Schema's integer admits 300.0
            elif field == "scopes" or (noun == "clients" and field == "name" and value is not None):
                value = value.strip()
            out[field] = value
        return out

    def target_key(self, ref: str) -> str:
        """A trust's target (base URL or name) -> base URL: the file's targets first."""
        for e in self.entries["targets"]:
            if ref in (e["base_url"], e.get("name")):
                return e["base_url"]
        row = self.change.target(ref)
        return row.base_url if row is not None else ref

    def trust_keys(self) -> dict:
        keys = {}
        for i, e in enumerate(self.entries["trusts"]):
            key = (e["client"], e["issuer"], self.target_key(e["target"]))
            if key in keys:
                raise Fail(f"trusts[{i}]: the same trust as trusts[{keys[key]}]")
            keys[key] = i
        return keys

    def check_unique(self):
        for noun in ("issuers", "targets", "clients"):
            field = FIELDS[noun][0][0]
            seen = {}
            for i, e in enumerate(self.entries[noun]):
                if e[field] in seen:
                    raise Fail(f"{noun}[{i}].{field}: {show(e[field])} is also {noun}[{seen[e[field]]}]")
                seen[e[field]] = i

    # -- the run ------------------------------------------------------------------------------
    def run(self):
        self.check_unique()
        keys = self.trust_keys()
        if self.prune:
            self.remove_unnamed(keys)
        for noun, step in (("issuers", self.issuer), ("targets", self.target), ("clients", self.client),
                           ("trusts", self.trust)):
            for i, e in enumerate(self.entries[noun]):
                with self.at(noun, i, e):
                    step(e, self.desired(noun, e), self.namer(noun, i))
                self.change.flush()

    def remove_unnamed(self, keys: dict):
        change = self.change
        for client_id, issuer_url, base_url, row in change.trusts():
            if (client_id, issuer_url, base_url) not in keys:
                change.remove(row)
                revoke_on_remove(change, "trust", client_id=client_id, issuer=issuer_url, target=base_url)
                self.say("-", "trust", f"{client_id}/{issuer_url}/{base_url}")
        change.flush()
        named = {noun: {e[FIELDS[noun][0][0]] for e in self.entries[noun]} for noun in FIELDS}
        for row in change.clients():
            if row.client_id not in named["clients"]:
                change.remove_with_trusts(row)
                revoke_on_remove(change, "client", client_id=row.client_id)
                self.say("-", "client", row.client_id)
        for row in change.targets():
            if row.base_url not in named["targets"]:
                deps = change.target_dependents(row)
                extra = ", ".join(f"{n} {what}" for what, n in (("patient link(s)", deps["links"]),
                                                                 ("consent(s)", deps["consents"]),
                                                                 ("user link(s)", deps["user_links"])) if n)
                change.remove_target(row)
                self.say("-", "target", row.base_url + (f" (and {extra})" if extra else ""))
        for row in change.issuers():
            if row.url not in named["issuers"]:
                change.remove_with_trusts(row)
                self.say("-", "issuer", row.url)
        change.flush()
        self.removed = len(self.lines)

    def options(self, noun: str, want: dict, have: dict | None) -> tuple[dict, list]:
        """The options that make ``have`` (None: a new object) into ``want``, and the
        changed fields' lines."""
        o, said = {}, []
        for field, key in FIELDS[noun][1:]:
            if key is None or field.endswith("_env") or (noun == "clients" and field in _CREDENTIALS):
                continue
            value = want[field]
            if have is None:
                if value is not None and value != []:
                    o[key] = ",".join(value) if field == "algs" else value
                continue
            if value == have[field]:
                continue
            said.append(f"{field} {show(have[field])} → {show(value)}")
            if field == "algs":
                o[key] = ",".join(value)
            elif field in LISTS:
                o[key] = value or [""]  # '' clears a repeatable option
            elif value is not None:
                o[key] = value
            elif key == "max_ttl":
                o["no_max_ttl"] = True
            elif noun == "targets" and key == "name":
                o["no_name"] = True
            else:
                o[key] = ""  # update: '' removes it
        return o, said

    def secret(self, noun: str, field: str, row, var, name) -> tuple[str | None, str | None]:
        """-> (the variable to read it from, or None; the line's words) when the stored
        secret is not the one ``var`` holds (or one is stored and the file names none)."""
        what, column = _SECRET[(noun, field)]
        stored = getattr(row, column) if row is not None else None
        if var is None:
            return None, (f"{what} removed" if stored else None)
        value = secret_from_env(var, what, name(field))
        if stored is None:
            return var, f"{what} set from {var}"
        if column == "secret_hash":
            same = check_secret(value, row.secret_salt, row.secret_hash, self.ctx.settings.key_secret)
        else:
            try:
                same = unseal(stored, self.ctx.settings.key_secret) == value
            except (SealError, ValueError):
                same = False
        return (None, None) if same else (var, f"{what} replaced from {var}")

    def issuer(self, e, want, name):
        change, url = self.change, e["url"]
        row = change.issuer(url)
        o, said = self.options("issuers", want, None if row is None else fields_of("issuers", row))
        for field in ("introspection_secret_env", "login_secret_env"):
            var, words = self.secret("issuers", field, row, want[field], name)
            if var:
                o[field] = var
            elif words and field == "login_secret_env":
                o["no_login_secret"] = True
            elif words:  # only --no-introspection removes the secret: then set the rest again
                o["no_introspection"] = True
                for key in ("introspection_endpoint", "introspection_client_id"):
                    if want[key] is not None:
                        o[key] = want[key]
            if words and row is not None:
                said.append(words)
        if row is None:
            issuers.new_issuer(self.ctx, change, url, o, name=name, url_name=name("url"))
            self.say("+", "issuer", url)
        elif o:
            issuers.apply_options(self.ctx, change, row, o, creating=False, name=name)
            for words in said:
                self.say("~", "issuer", f"{url}: {words}")

    def target(self, e, want, name):
        change, base_url = self.change, e["base_url"]
        row = change.target(base_url)
        row = row if row is not None and row.base_url == base_url else None
        o, said = self.options("targets", want, None if row is None else fields_of("targets", row))
        var, words = self.secret("targets", "introspection_secret_env", row, want["introspection_secret_env"],
                                 name)
        if var:
            o["introspection_secret_env"] = var
        elif words:
            o["no_introspection_secret"] = True
        if row is None:
            targets.new_target(self.ctx, change, base_url, o, name=name, url_name=name("base_url"))
            self.say("+", "target", base_url)
        elif o:
            targets.apply_options(self.ctx, change, row, o, name)
            for words in [*said, *([words] if words else [])]:
                self.say("~", "target", f"{base_url}: {words}")

    def client(self, e, want, name):
        change, client_id = self.change, e["client_id"]
        row = change.client(client_id)
        given = {k: want[k] for k in _CREDENTIALS if want[k]}
        creds, _ = clients.credentials(self.ctx, given, required=True, name=name)  # checks them either way
        o, said = self.options("clients", want, None if row is None else fields_of("clients", row))
        if row is None:
            row, _ = clients.new_client(self.ctx, change, client_id, {**o, **given}, name=name,
                                        id_name=name("client_id"))
            row.disabled = want["disabled"]
            self.say("+", "client", client_id + (" (disabled)" if row.disabled else ""))
            return
        have = fields_of("clients", row)
        if "secret_env" in given:
            var, words = self.secret("clients", "secret_env", row if row.auth_method == "client_secret" else None,
                                     given["secret_env"], name)
            changed = var is not None
        elif "jwks" in given:
            changed = have["jwks"] != creds["jwks"] or have["jwks_uri"] is not None
            kids = ", ".join(str(k.get("kid")) for k in creds["jwks"]["keys"])
            words = f"jwks replaced (kid {printable(kids)})"
        else:
            changed = have["jwks_uri"] != creds["jwks_uri"]
            words = f"jwks_uri {show(have['jwks_uri'])} → {show(creds['jwks_uri'])}"
        if changed:
            for k, v in creds.items():
                setattr(row, k, v)
            said.append(words)
        if o:
            clients.apply_options(self.ctx, row, o, name)
        if bool(row.disabled) != want["disabled"]:  # as `client disable|enable` does
            said.append(f"disabled {show(bool(row.disabled))} → {show(want['disabled'])}")
            row.disabled = want["disabled"]
            if row.disabled:
                revoke_on_remove(change, "client", client_id=client_id)
        for words in said:
            self.say("~", "client", f"{client_id}: {words}")

    def trust(self, e, want, name):
        change = self.change
        found = []
        for field, kind, look in (("client", "client", change.client), ("issuer", "issuer", change.issuer),
                                  ("target", "target", change.target)):
            row = look(e[field])
            if row is None:
                where = "the file" if self.prune else "the file or the database"
                raise Fail(f"{name(field)}: no {kind} {show(e[field])} in {where}")
            found.append(row)
        c, i, t = found
        text = f"{c.client_id}/{i.url}/{t.base_url}"
        row = change.trust(c, i, t)
        o, said = self.options("trusts", want, None if row is None else
                               fields_of("trusts", row, (c.client_id, i.url, t.base_url)))
        if row is None:
            trusts.new_trust(change, c, i, t, o, name)
            self.say("+", "trust", text)
        elif o:
            trusts.apply_options(row, o, name)
            for words in said:
                self.say("~", "trust", f"{text}: {words}")
