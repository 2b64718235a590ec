"""`token-exchange issuer check`: does this EHR give the service what it needs?

For an EHR's implementers and for the admin registering it: discovery, the JWKS
(reachable, key types, algorithms against the allow-list), and sample tokens,
claim by claim, each finding a plain sentence (docs/EHR.md says the same at
length). Nothing is written.
"""
from __future__ import annotations

import json
import re
import shlex
import sys
import time

import click

from .. import jose, scopes
from ..consent.signin import web_origin
from .common import Ctx, printable
from .issuers import audience_problem, issuer

_PAIRWISE = re.compile(r"[A-Za-z0-9_\-+/=.]{32,}\Z")


class Report:
    def __init__(self):
        self.checks = []

    def ok(self, check, detail):
        self.checks.append({"check": check, "outcome": "ok", "detail": detail})

    def fail(self, check, detail):
        self.checks.append({"check": check, "outcome": "fail", "detail": detail})

    def note(self, check, detail):
        self.checks.append({"check": check, "outcome": "note", "detail": detail})

    @property
    def passed(self):
        return all(c["outcome"] != "fail" for c in self.checks)


def _read(path):
    try:
        with (sys.stdin if path == "-" else open(path, encoding="utf-8")) as f:
            return f.read(64 * 1024).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise click.UsageError(f"cannot read {printable(path)}: {getattr(e, 'strerror', None) or 'not UTF-8'}")


@issuer.command("check")
@click.argument("issuer_url")
@click.option("--id-token", metavar="FILE", help="A sample ID token from this EHR (- for stdin).")
@click.option("--access-token", metavar="FILE", help="A sample access token from this EHR.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def issuer_check(issuer_url, id_token, access_token, as_json):
    """Check an EHR's discovery, keys and sample tokens against what the service
    needs, with a plain sentence for each problem. Exits 0 when nothing fails."""
    id_text = _read(id_token) if id_token else None
    at_text = _read(access_token) if access_token else None
    ctx = Ctx()
    with ctx.store.admin.change() as change:
        row = change.issuer(issuer_url)
        registered = None if row is None else {
            "jwks_uri": row.jwks_uri, "algs": list(row.algs), "sources": list(row.sources),
            "audiences": list(row.audiences or ()), "patient_claim": row.patient_claim,
            "source_claim": row.source_claim, "identifier_claim": row.identifier_claim,
            "identifier_systems": list(row.identifier_systems or ()),
            "upstream_clients": sorted({t.upstream_client_id for _, url, _, t in change.trusts() if url == issuer_url})}
    report = check(issuer_url, registered, id_text, at_text, ctx.settings)
    if as_json:
        click.echo(json.dumps({"issuer": issuer_url, "registered": registered is not None, "ok": report.passed,
                               "checks": report.checks}, indent=2))
    else:
        marks = {"ok": "ok  ", "fail": "FAIL", "note": "note"}
        for c in report.checks:
            click.echo(f"{marks[c['outcome']]} {c['check']}: {printable(c['detail'])}")
        click.echo("the service can use this issuer" if report.passed else "the service cannot use this issuer as is")
    sys.exit(0 if report.passed else 1)


def check(issuer_url, registered, id_token, access_token, settings) -> Report:
    from ..issuers import discover
    from ..upstream import Upstream
    upstream = Upstream(settings)  # the one outbound client: total deadline, size cap
    r = Report()
    if registered is None:
        r.note("registration", "not registered yet: checking against the defaults of `issuer add`")
    cfg = registered or {"jwks_uri": None, "algs": list(jose.DEFAULT_ISSUER_ALGS), "sources": [], "audiences": [],
                         "patient_claim": "patient", "source_claim": "source",
                         "identifier_claim": "patient_identifier", "identifier_systems": [], "upstream_clients": []}
    doc = None
    try:
        doc = discover(issuer_url, settings.http_timeout, upstream)
        r.ok("discovery", f"found; issuer matches and jwks_uri is {doc['jwks_uri']}")
    except ValueError as e:
        (r.note if registered else r.fail)("discovery", f"{e}" + ("; the registered jwks_uri is used" if registered
                                                              else "; register it with --jwks-uri instead"))
    if doc:
        if "pairwise" in _strings(doc.get("subject_types_supported")):
            r.note("subject types", "the EHR supports pairwise sub: one user has a different sub per client; "
                                    "consents and audit name users by (issuer, sub)")
        for endpoint in ("token_endpoint", "authorization_endpoint"):
            if not doc.get(endpoint):
                r.note(endpoint, f"discovery names no {endpoint}: Backend Services reads and the consent sign-in "
                                 "need one (or register it with --" + endpoint.replace("_", "-") + ")")
            elif web_origin(doc[endpoint]) is None:
                r.fail(endpoint, f"discovery's {endpoint} is not an absolute http(s) URL with a valid host: the "
                                 "consent sign-in at this EHR stays off until the EHR fixes it (or register a correct "
                                 "one with --" + endpoint.replace("_", "-") + ")")
        advertised = _strings(doc.get("id_token_signing_alg_values_supported"))
        usable = [a for a in advertised if a in cfg["algs"]]
        if advertised and not usable:
            r.fail("algorithms", f"the EHR signs ID tokens with {', '.join(map(str, advertised))}; the allow-list is "
                                 f"{', '.join(cfg['algs'])}: add one with `issuer update --algs`")
    jwks_uri = (registered or {}).get("jwks_uri") or (doc or {}).get("jwks_uri")
    keys = _check_jwks(r, jwks_uri, cfg, upstream) if jwks_uri else {}
    if not jwks_uri:
        r.fail("jwks", "no JWKS URL: neither registered nor discovered")
    for text, what in ((access_token, "access token"), (id_token, "ID token")):
        if text:
            _check_token(r, text, what, issuer_url, keys, cfg, doc, settings)
    if not (access_token or id_token):
        r.note("sample tokens", "give --id-token FILE and --access-token FILE to check their claims too")
    return r


def _strings(value) -> list:
    """A discovery document's list of strings; anything else in it is not read."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _check_jwks(r: Report, uri, cfg, upstream) -> dict:
    from ..issuers import import_keys
    from ..upstream import UpstreamError
    try:
        reply = upstream.get_json(uri, headers={"Accept": "application/json"})
        if reply.status != 200:
            raise UpstreamError("answered", reply.status)
        keys = import_keys(reply.json)
    except (UpstreamError, ValueError) as e:
        r.fail("jwks", f"{uri} cannot be used ({e})")
        return {}
    raw = {k.get("kid") or "": k for k in reply.json["keys"] if isinstance(k, dict)}
    skipped = [printable(str(k.get("kid"))) for kid, k in raw.items() if kid not in {x.kid for x in keys}]
    if skipped:
        r.note("jwks key", f"unusable for signatures (unknown type or curve, malformed, or not use sig): "
                           f"{', '.join(skipped)}")
    described = []
    for k in keys:
        j = raw.get(k.kid, {})
        kind = str(j.get("kty")) + (f" {j.get('crv')}" if j.get("crv") else "")
        described.append(f"{k.kid or '(no kid)'} {kind}" + (f" {k.alg}" if k.alg else ""))
        if k.alg and k.alg not in cfg["algs"]:
            r.note("jwks key", f"key {k.kid} is for {k.alg}, not in the allow-list {', '.join(cfg['algs'])}")
    if keys:
        r.ok("jwks", f"{uri} reachable: " + "; ".join(described))
    else:
        r.fail("jwks", f"{uri} has no usable signing key")
    return {k.kid: k.jwk for k in keys}


def _check_token(r: Report, text, what, issuer_url, keys, cfg, doc, settings):
    try:
        parsed = jose.parse(text)
    except jose.MalformedToken:
        r.fail(what, "not a JWT (opaque access tokens need --introspection-endpoint at `issuer add`)")
        return
    h, c = parsed.header, parsed.claims
    alg, kid = h.get("alg"), h.get("kid")
    key = keys.get(kid) if kid is not None else (next(iter(keys.values())) if len(keys) == 1 else None)
    if alg not in cfg["algs"] or alg not in jose.ASYMMETRIC_ALGS:
        r.fail(f"{what} alg", f"signed {alg}, not one of the allowed {', '.join(cfg['algs'])}")
    elif key is None:
        r.fail(f"{what} signature", f"its kid {kid!r} is not in the JWKS" if kid else "no kid, and the JWKS "
                                    "has more than one key: put kid in the header")
    elif not jose.verify_signature(parsed, alg, key.key):
        r.fail(f"{what} signature", "does not verify with the published key")
    else:
        r.ok(f"{what} signature", f"{alg} with key {kid}")
    if c.get("iss") != issuer_url:
        r.fail(f"{what} iss", f"is {c.get('iss')!r}; it must equal {issuer_url} exactly (no trailing slash "
                              "difference)")
    failed = jose.check_times(c, time.time(), jose.CLOCK_LEEWAY)
    if failed == "exp":
        r.fail(f"{what} exp", "missing or not a number: every token needs exp")
    elif failed == "expired":
        r.note(f"{what} exp", "has passed (fine for a sample; a live token must be unexpired)")
    elif failed:
        r.fail(f"{what} {failed}", "lies in the future: check the EHR's clock")
    sub = c.get("sub")
    if not isinstance(sub, str) or not sub:
        r.fail(f"{what} sub", "missing: the service names the user by (issuer, sub)")
    elif _PAIRWISE.match(sub):
        r.note(f"{what} sub", "looks pairwise (long and opaque): the same user may have another sub at another "
                              "client; consents are given per sub")
    if what == "access token":
        _check_access_claims(r, c, cfg, issuer_url, settings)
    else:
        _check_id_claims(r, c, cfg)
    _check_patient_claims(r, c, what, cfg)


def _check_access_claims(r, c, cfg, issuer_url, settings):
    aud = c.get("aud")
    auds = [aud] if isinstance(aud, str) else [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []
    accepted = set(cfg["sources"]) | set(cfg["audiences"])
    if not auds:
        r.fail("access token aud", "missing: it must name the FHIR server it is for (a source)")
    elif any(settings.names_service(a) for a in auds):
        r.fail("access token aud", f"{auds} names this service: the service refuses a subject token addressed to "
                                   "it; the EHR must issue the access token for its FHIR server (a source)")
    elif accepted and not accepted.intersection(auds):
        r.fail("access token aud", f"{auds} names none of the registered sources or audiences"
                                   + _audience_advice(issuer_url, auds, cfg, settings))
    else:
        r.ok("access token aud", ", ".join(auds))
    if not isinstance(c.get("client_id", c.get("azp")), str):
        r.fail("access token client_id", "neither client_id nor azp: the trust's upstream client cannot be checked")
    else:
        r.ok("access token client_id", c.get("client_id", c.get("azp")))
    if any(n in c for n in ("nonce", "at_hash")):
        r.fail("access token shape", "carries nonce or at_hash: this looks like an ID token")
    raw = c.get("scope", c.get("scp"))
    text = " ".join(raw) if isinstance(raw, list) else raw if isinstance(raw, str) else ""
    found = scopes.parse(text, strict=False) if text else None
    if not found:
        r.fail("access token scope", "no SMART resource scopes (e.g. patient/*.rs): nothing could be granted")
    else:
        r.ok("access token scope", found.format())


def _audience_advice(issuer_url, auds, cfg, settings) -> str:
    """The `issuer update` that would accept this token, if the CLI accepts it: --audience
    replaces the whole list, so the advice repeats the registered ones."""
    usable = [a for a in auds if audience_problem(settings, a) is None]
    if not usable:
        return "; if the token is meant for a FHIR server, the EHR must name it in aud"
    argv = ["token-exchange", "issuer", "update", issuer_url]
    for a in list(cfg["audiences"]) + usable[:1]:
        argv += ["--audience", a]
    return f"; if {usable[0]} is the FHIR server it is for, accept it with `{shlex.join(argv)}`"


def _check_id_claims(r, c, cfg):
    """OpenID Connect Core 3.1.3.7: aud names the app's client id at the EHR, which the
    exchange checks against the trust's upstream client (rule 3): ok only when some trust
    of this issuer names it."""
    auds = jose.audiences(c) if c.get("aud") else []
    upstream = cfg["upstream_clients"]
    if not auds:
        r.fail("ID token aud", "missing: it must name the app's client id at the EHR")
    elif not upstream:
        r.note("ID token aud", f"{', '.join(map(str, auds))}: no trust names an upstream client for this issuer yet, "
                               "so it is unchecked; `trust add --upstream-client-id` names the app's client id there")
    elif not set(upstream).intersection(auds):
        r.fail("ID token aud", f"{', '.join(map(str, auds))} is no trust's upstream client (trusts name "
                               f"{', '.join(upstream)}): the EHR issued it to another app, or a trust needs "
                               "`trust update --upstream-client-id` with this app's client id at the EHR")
    else:
        r.ok("ID token aud", ", ".join(a for a in auds if a in upstream))
    if any(n in c for n in ("scope", "scp", "client_id")):
        r.fail("ID token shape", "carries scope or client_id: this looks like an access token")
    if not isinstance(c.get("fhirUser"), str):
        r.note("ID token fhirUser", "missing: minted tokens carry none, and consent signed by the patient needs it")
    else:
        r.ok("ID token fhirUser", c["fhirUser"])


def _check_patient_claims(r, c, what, cfg):
    pc, sc, ic = cfg["patient_claim"], cfg["source_claim"], cfg["identifier_claim"]
    patient, source = c.get(pc), c.get(sc)
    if patient is None:
        r.note(f"{what} {pc}", "no patient claim: no patient/ scopes can be granted from this token alone")
    elif not isinstance(patient, str) or not patient:
        r.fail(f"{what} {pc}", "must be a patient id or a Patient reference string")
    else:
        r.ok(f"{what} {pc}", patient)
    if source is not None:
        if cfg["sources"] and source not in cfg["sources"]:
            r.fail(f"{what} {sc}", f"{source} is not a registered source; `issuer update --source` adds it")
        else:
            r.ok(f"{what} {sc}", str(source))
    elif patient is not None and len(cfg["sources"]) > 1 and "/Patient/" not in str(patient):
        r.fail(f"{what} {sc}", "no source claim and several registered sources: the patient cannot be placed")
    idents = c.get(ic)
    if idents is not None:
        ok = isinstance(idents, list) and all(
            (isinstance(i, dict) and isinstance(i.get("system"), str) and isinstance(i.get("value"), str))
            or (isinstance(i, str) and "|" in i) for i in idents)
        if not ok:
            r.fail(f"{what} {ic}", "must be an array of FHIR Identifier objects or system|value strings")
        else:
            systems = sorted({i["system"] if isinstance(i, dict) else i.split("|", 1)[0] for i in idents})
            vouched = [s for s in systems if s in cfg["identifier_systems"]]
            r.ok(f"{what} {ic}", f"systems {', '.join(systems)}; vouched for: {', '.join(vouched) or 'none'}")
