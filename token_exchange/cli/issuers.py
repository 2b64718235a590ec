"""`issuer add|update|list|show|remove`: trusted source authorization servers (EHRs)."""
from __future__ import annotations

import click

from .. import jose
from ..clock import utcnow
from ..models import Issuer
from ..sealing import seal
from .common import (Fail, cli, cli_flag, identifier_system, option_values, commit, emit, found, given_options, json_option, options,
                     pass_ctx, printable, remove_with_trusts, secret_from_env, show, url_arg, yes_option)


@cli.group()
def issuer():
    """Trusted source authorization servers (EHRs)."""


def _options(update: bool):
    """The options of `issuer add`, shared by `issuer update` (where only those given change)."""
    d = (lambda v: None) if update else (lambda v: v)
    listed = " Given in update, replaces the whole list ('' clears it)." if update else ""
    opts = [
        click.option("--jwks-uri", metavar="URL", help="The issuer's JWKS URL."),
        click.option("--discover", is_flag=True, default=None if update else False,
                     help="Read jwks_uri (and the introspection and token endpoints) from the issuer's "
                          "OpenID Connect or RFC 8414 discovery document."),
        click.option("--source", "sources", multiple=True, metavar="FHIR_BASE",
                     help="A FHIR base URL whose patients this issuer may vouch for (repeatable)." + listed),
        click.option("--audience", "audiences", multiple=True, metavar="AUD",
                     help="Another accepted aud of its access tokens besides the sources (repeatable)." + listed),
        click.option("--algs", default=d(",".join(jose.DEFAULT_ISSUER_ALGS)), show_default=not update,
                     help="Comma-separated signing algorithms accepted from it (asymmetric only)."),
        click.option("--patient-claim", default=d("patient"), show_default=not update, metavar="NAME",
                     help="The claim that carries the launch patient."),
        click.option("--source-claim", default=d("source"), show_default=not update, metavar="NAME",
                     help="The claim that carries the FHIR base URL the patient id belongs to."),
        click.option("--introspection-endpoint", metavar="URL",
                     help="RFC 7662 endpoint for its opaque access tokens."),
        click.option("--introspection-client-id", metavar="ID", help="The service's client id there."),
        click.option("--introspection-secret-env", metavar="VAR",
                     help="Environment variable holding the introspection secret (stored encrypted)."),
        click.option("--identifier-system", "identifier_systems", multiple=True, metavar="SYSTEM",
                     help="A patient identifier system this issuer may vouch for, for matching (repeatable)."
                          + listed),
        click.option("--identifier-claim", default=d("patient_identifier"), show_default=not update, metavar="NAME",
                     help="The claim that carries the patient's identifiers."),
        click.option("--user-identifier-system", "user_identifier_systems", multiple=True, metavar="SYSTEM",
                     help="A user identifier system (e.g. http://hl7.org/fhir/sid/us-npi) this issuer may vouch "
                          "for, for mapping users onto targets (repeatable)." + listed),
        click.option("--user-identifier-claim", default=d("fhirUser_identifier"), show_default=not update,
                     metavar="NAME", help="The claim that carries the user's identifiers."),
        click.option("--fhir-client-id", metavar="ID",
                     help="The service's SMART Backend Services client id at this EHR (reads the source "
                          "Patient's, or the user's, identifiers when its tokens carry none)."),
        click.option("--fhir-scope", metavar="SCOPE", help="Scope asked for with --fhir-client-id "
                                                           "(default system/Patient.rs, and system/{Type}.rs "
                                                           "to read a user's own resource)."),
        click.option("--token-endpoint", metavar="URL",
                     help="The EHR's token endpoint (default: from discovery)."),
        click.option("--login-client-id", metavar="ID",
                     help="The service's OpenID Connect client id at this EHR, for consent sign-in."),
        click.option("--login-secret-env", metavar="VAR",
                     help="Environment variable holding that client's secret (without one: private_key_jwt)."),
        click.option("--authorization-endpoint", metavar="URL",
                     help="The EHR's authorization endpoint (default: from discovery)."),
    ]
    if update:
        opts.append(click.option("--no-introspection", is_flag=True, help="Remove the introspection settings."))
    return options(opts)


FLAG = cli_flag({"sources": "--source", "audiences": "--audience", "identifier_systems": "--identifier-system",
                 "user_identifier_systems": "--user-identifier-system"})


def new_issuer(ctx, change, issuer_url: str, o: dict, name=FLAG, url_name: str = "ISSUER_URL") -> Issuer:
    """`issuer add` and `config apply`: check ISSUER_URL and the options, and add the issuer
    to the change (not committed). ``name`` says how messages name an option."""
    url_arg(issuer_url, url_name)
    if ctx.settings.names_service(issuer_url):
        raise Fail(f"{url_name} is this service's own issuer URL")
    if change.has_issuer(issuer_url):
        raise Fail(f"issuer {printable(issuer_url)} already exists; change it with `issuer update`")
    if change.has_client(issuer_url):
        raise Fail(f"{printable(issuer_url)} is a registered client id; an issuer URL must not be one")
    row = Issuer(url=issuer_url, sources=[], audiences=[], identifier_systems=[], user_identifier_systems=[],
                 created=utcnow())
    apply_options(ctx, change, row, o, creating=True, name=name)
    change.add(row)
    return row


def apply_options(ctx, change, row: Issuer, o: dict, creating: bool, name=FLAG):
    """Validate the given options and set them on row; then check the whole. The one
    home of each issuer option's rule: `issuer add|update` and `config apply` call it."""
    if o.get("discover") and o.get("jwks_uri"):
        raise Fail("give --jwks-uri URL or --discover, not both")
    if creating and not o.get("discover") and not o.get("jwks_uri"):
        raise Fail("give exactly one of --jwks-uri URL or --discover")
    if o.get("discover"):
        from ..issuers import discover
        try:
            doc = discover(row.url, ctx.settings.http_timeout)
        except ValueError as e:
            raise Fail(f"{printable(str(e))}; check the issuer URL and that the EHR is up, or give --jwks-uri URL "
                       "instead of --discover") from None
        row.jwks_uri = url_arg(doc["jwks_uri"], "the discovered jwks_uri")
        for key, attr in (("introspection_endpoint", "introspection_endpoint"),
                          ("token_endpoint", "token_endpoint"),
                          ("authorization_endpoint", "authorization_endpoint")):
            if o.get(attr) is None and isinstance(doc.get(key), str):
                o[attr] = doc[key]
    if o.get("jwks_uri") is not None:
        row.jwks_uri = url_arg(o["jwks_uri"], name("jwks_uri"))
    if o.get("sources"):
        row.sources = [url_arg(v, name("sources")) for v in option_values(o["sources"])]
    if o.get("audiences"):
        row.audiences = [_audience(ctx, v, name("audiences")) for v in option_values(o["audiences"])]
    if o.get("algs") is not None:
        algs = [a.strip() for a in o["algs"].split(",") if a.strip()]
        bad = [a for a in algs if a not in jose.ASYMMETRIC_ALGS]
        if not algs or bad:
            raise Fail(f"{name('algs')} must list asymmetric algorithms from {','.join(jose.ASYMMETRIC_ALGS)}; "
                       f"not {printable(','.join(bad)) or 'empty'}")
        row.algs = algs
    for opt in ("patient_claim", "source_claim", "identifier_claim", "user_identifier_claim"):
        if o.get(opt) is not None:
            value = o[opt]
            if not value or len(value) > 64 or not value.isprintable() or " " in value:
                raise Fail(f"{name(opt)} must be a claim name (1-64 characters, no spaces)")
            setattr(row, opt, value)
    if o.get("no_introspection"):
        row.introspection_endpoint = row.introspection_client_id = row.introspection_secret = None
    for opt in ("introspection_endpoint", "token_endpoint", "authorization_endpoint"):
        if o.get(opt) is not None:
            clear = o[opt] == "" and not creating  # update: '' removes it
            setattr(row, opt, None if clear else url_arg(o[opt], name(opt)))
    for opt in ("introspection_client_id", "fhir_client_id", "login_client_id", "fhir_scope"):
        if o.get(opt) is not None:
            value = o[opt]
            if value and (len(value) > 255 or not value.isprintable()):
                raise Fail(f"{name(opt)} must be 1-255 printable characters")
            setattr(row, opt, value or None)
    if o.get("introspection_secret_env"):
        row.introspection_secret = seal(secret_from_env(o["introspection_secret_env"], "introspection secret",
                                                        name("introspection_secret_env")), ctx.sealing_secret())
    if o.get("no_login_secret"):  # config apply: the file names no login secret
        row.login_secret = None
    if o.get("login_secret_env"):
        row.login_secret = seal(secret_from_env(o["login_secret_env"], "login client secret",
                                                name("login_secret_env")), ctx.sealing_secret())
    if o.get("identifier_systems"):
        row.identifier_systems = [identifier_system(v, name("identifier_systems"))
                                  for v in option_values(o["identifier_systems"])]
    if o.get("user_identifier_systems"):
        row.user_identifier_systems = [identifier_system(v, name("user_identifier_systems"))
                                       for v in option_values(o["user_identifier_systems"])]
    # The whole, as it will be stored.
    if not row.sources:
        raise Fail("give at least one --source FHIR_BASE the issuer may vouch for")
    intro = (row.introspection_endpoint, row.introspection_client_id, row.introspection_secret)
    if (row.introspection_client_id or row.introspection_secret) and not all(intro):
        raise Fail("introspection needs --introspection-endpoint, --introspection-client-id and "
                   "--introspection-secret-env together")
    if row.fhir_client_id:
        _check_backend_services_key(change)


def audience_problem(settings, value, what="--audience") -> str | None:
    """Why --audience refuses value (None: it accepts it). An accepted access-token aud is
    never this service itself (a token addressed to the service is a grant, not an access
    token for a FHIR server). `issuer check` asks the same before it advises a value."""
    if not value or len(value) > 2048 or not value.isprintable():
        return f"{what} must be 1-2048 printable characters"
    if settings.names_service(value):
        return f"{what} {printable(value)!r} names this service; only FHIR servers' audiences belong here"
    return None


def _audience(ctx, value, what="--audience"):
    problem = audience_problem(ctx.settings, value, what)
    if problem:
        raise Fail(problem)
    return value


def _check_backend_services_key(change):
    """SMART Backend Services assertions are RS384 or ES384: an RSA or P-384 active key."""
    alg = change.active_key_alg()
    if alg is not None and alg not in ("RS256", "PS256", "ES384"):
        raise Fail(f"--fhir-client-id needs an active RSA or P-384 signing key (Backend Services sign RS384 or "
                   f"ES384); the active key is {alg}: run `token-exchange keys rotate --alg RS256`")


@issuer.command("add")
@click.argument("issuer_url")
@_options(update=False)
@pass_ctx
def issuer_add(ctx, issuer_url, **o):
    """Trust ISSUER_URL (its exact iss) as a source authorization server."""
    with ctx.store.admin.change() as change:
        new_issuer(ctx, change, issuer_url, o)
        commit(ctx, change, "issuer.add", issuer_url)
    click.echo(f"issuer {printable(issuer_url)} added")


@issuer.command("update")
@click.argument("issuer_url")
@_options(update=True)
@pass_ctx
def issuer_update(ctx, issuer_url, **o):
    """Change ISSUER_URL's settings: only the options given change."""
    given = given_options(o)
    if not given:
        raise Fail("nothing to change: give at least one option (see `issuer update --help`)")
    with ctx.store.admin.change() as change:
        row = found(change.issuer(issuer_url), "issuer", issuer_url)
        apply_options(ctx, change, row, given, creating=False)
        commit(ctx, change, "issuer.update", f"{issuer_url}: {', '.join(sorted(given))}")
    click.echo(f"issuer {printable(issuer_url)} updated")


def issuer_row(i: Issuer) -> dict:
    return {"issuer": i.url, "jwks_uri": i.jwks_uri, "algs": i.algs, "sources": i.sources,
            "audiences": i.audiences, "patient_claim": i.patient_claim, "source_claim": i.source_claim,
            "introspection_endpoint": i.introspection_endpoint,
            "introspection_client_id": i.introspection_client_id,
            "introspection_secret": "set" if i.introspection_secret else None,
            "identifier_systems": i.identifier_systems or [], "identifier_claim": i.identifier_claim,
            "user_identifier_systems": i.user_identifier_systems or [],
            "user_identifier_claim": i.user_identifier_claim, "fhir_client_id": i.fhir_client_id, "fhir_scope": i.fhir_scope,
            "token_endpoint": i.token_endpoint, "authorization_endpoint": i.authorization_endpoint,
            "login_client_id": i.login_client_id, "login_secret": "set" if i.login_secret else None}


@issuer.command("list")
@json_option
@pass_ctx
def issuer_list(ctx, as_json):
    """List the trusted issuers."""
    with ctx.store.admin.change() as change:
        rows = [issuer_row(i) for i in change.issuers()]
    emit(rows, as_json, ["issuer", "jwks_uri", "sources", "algs"])


@issuer.command("show")
@click.argument("issuer_url")
@json_option
@pass_ctx
def issuer_show(ctx, issuer_url, as_json):
    """Show one issuer's settings (secrets only as 'set')."""
    with ctx.store.admin.change() as change:
        show(issuer_row(found(change.issuer(issuer_url), "issuer", issuer_url)), as_json)


@issuer.command("remove")
@click.argument("issuer_url")
@yes_option
@pass_ctx
def issuer_remove(ctx, issuer_url, yes):
    """Remove an issuer (with --yes, also every trust that names it)."""
    remove_with_trusts(ctx, issuer_url, "issuer", yes)
