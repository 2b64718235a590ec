"""Tests for token_exchange.policy: the trust, upstream-client, form, scope and
lifetime decisions, pure over plain values (STYLE, principle 2).

Each table row names the rule it checks, its inputs, and the exact result or the
exact ``error`` code. The configuration is built from stand-ins with the
attributes policy reads (types.SimpleNamespace), so these tests do not depend on
where the config dataclasses live.
"""
from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from token_exchange import policy, scopes, urns


class Err:
    """The expected outcome of a refused decision: its OAuth ``error`` code."""

    def __init__(self, error: str):
        self.error = error

    def __repr__(self):
        return f"Err({self.error!r})"


def decide(f, *args):
    """f(*args), or Err(code) for the OAuth2Error it raises."""
    try:
        return f(*args)
    except Exception as e:  # noqa: BLE001  (only OAuth2Errors carry .error)
        if not hasattr(e, "error"):
            raise
        return Err(e.error)


def same(got, expected) -> bool:
    if isinstance(expected, Err):
        return isinstance(got, Err) and got.error == expected.error
    return got == expected


def rows(table):
    return [pytest.param(*row, id=row[0]) for row in table]


EHR_A, EHR_B, EHR_C = "https://ehr-a.example", "https://ehr-b.example", "https://ehr-c.example"
UPSTREAM = "ehr-app"


def trust(client_id="app", issuer=EHR_A, target_id=1, scope_text="patient/*.rs", upstream=UPSTREAM,
          max_ttl=None, allow_id_token=False):
    return NS(client_id=client_id, issuer=issuer, target_id=target_id, scopes=scopes.parse(scope_text),
              upstream_client_id=upstream, max_ttl=max_ttl, allow_id_token=allow_id_token)


# -- find_trust: a trust for this issuer (else invalid_request), then for this target (else invalid_target) --
T_A1 = trust(issuer=EHR_A, target_id=1)
T_A3 = trust(issuer=EHR_A, target_id=3)
T_B2 = trust(issuer=EHR_B, target_id=2)
T_OTHER = trust(client_id="other", issuer=EHR_C, target_id=1)
CFG = NS(trusts={(t.client_id, t.issuer, t.target_id): t for t in (T_A1, T_A3, T_B2, T_OTHER)},
         trusts_by_client={"app": [T_A1, T_A3, T_B2], "other": [T_OTHER]})

FIND_TRUST = [
    # rule, client_id, issuer, target id, expected
    ("the trust of client, issuer and target", "app", EHR_A, 1, T_A1),
    ("one client, one issuer, several targets", "app", EHR_A, 3, T_A3),
    ("one client, several issuers", "app", EHR_B, 2, T_B2),
    ("issuer trusted for the client but not this target: invalid_target", "app", EHR_A, 2, Err("invalid_target")),
    ("issuer not trusted for this client: invalid_request", "app", EHR_C, 1, Err("invalid_request")),
    ("another client's trust does not count", "other", EHR_A, 1, Err("invalid_request")),
    ("unknown client: invalid_request", "nobody", EHR_A, 1, Err("invalid_request")),
    ("the issuer is checked before the target", "app", EHR_C, 99, Err("invalid_request")),
]


@pytest.mark.parametrize("rule, client_id, issuer, target_id, expected", rows(FIND_TRUST))
def test_find_trust(rule, client_id, issuer, target_id, expected):
    got = decide(policy.find_trust, CFG, client_id, issuer, NS(id=target_id))
    assert got is expected if not isinstance(expected, Err) else same(got, expected)


# -- check_upstream: rule 3, the tokens were issued to the trust's upstream client --
def presented(subject_type=urns.ACCESS_TOKEN, claims=None, id_claims=None, token_scopes=None):
    return NS(subject_type=subject_type, claims=claims or {}, id_claims=id_claims, token_scopes=token_scopes)


AT_OK = {"client_id": UPSTREAM}

CHECK_UPSTREAM = [
    # rule, presented, expected (None: allowed)
    ("access token issued to the upstream client (client_id)", presented(claims=AT_OK), None),
    ("access token issued to the upstream client (azp)", presented(claims={"azp": UPSTREAM}), None),
    ("client_id is read before azp", presented(claims={"client_id": UPSTREAM, "azp": "x"}), None),
    ("client_id of another client, whatever azp says", presented(claims={"client_id": "x", "azp": UPSTREAM}),
     Err("invalid_request")),
    ("access token of another client", presented(claims={"client_id": "other-app"}), Err("invalid_request")),
    ("access token naming no client", presented(claims={"sub": "u"}), Err("invalid_request")),
    ("client_id compared exactly (no type coercion)", presented(claims={"client_id": ["ehr-app"]}),
     Err("invalid_request")),
    ("a JWT subject token is checked like an access token", presented(urns.JWT, claims={"client_id": "x"}),
     Err("invalid_request")),
    ("ID token as subject: its aud names the upstream client", presented(urns.ID_TOKEN, claims={},
                                                                        id_claims={"aud": UPSTREAM}), None),
    ("ID token as subject: the client_id claim is not read", presented(urns.ID_TOKEN, claims={"client_id": "x"},
                                                                      id_claims={"aud": [UPSTREAM]}), None),
    ("ID token aud is a list holding the upstream client", presented(
        urns.ID_TOKEN, id_claims={"aud": ["other", UPSTREAM], "azp": UPSTREAM}), None),
    ("ID token aud of another client", presented(urns.ID_TOKEN, id_claims={"aud": "other"}), Err("invalid_request")),
    ("ID token aud holding the upstream client but azp another", presented(
        urns.ID_TOKEN, id_claims={"aud": [UPSTREAM, "other"], "azp": "other"}), Err("invalid_request")),
    ("ID token without aud", presented(urns.ID_TOKEN, id_claims={"sub": "u"}), Err("invalid_request")),
    ("ID token aud entries that are not strings are ignored", presented(
        urns.ID_TOKEN, id_claims={"aud": [1, UPSTREAM]}), None),
    ("access token and actor ID token both issued to the upstream client", presented(
        claims=AT_OK, id_claims={"aud": UPSTREAM, "azp": UPSTREAM}), None),
    ("access token right, actor ID token of another client", presented(claims=AT_OK, id_claims={"aud": "other"}),
     Err("invalid_request")),
    ("access token wrong, actor ID token right", presented(claims={"client_id": "x"}, id_claims={"aud": UPSTREAM}),
     Err("invalid_request")),
]


@pytest.mark.parametrize("rule, given, expected", rows(CHECK_UPSTREAM))
def test_check_upstream(rule, given, expected):
    assert same(decide(policy.check_upstream, given, trust()), expected)


# -- allowed_form: the OpenID exchange (an ID token as subject) only where the trust allows it --
ALLOWED_FORM = [
    # rule, subject token type, trust allows id_token, expected
    ("access token, trust without the OpenID exchange", urns.ACCESS_TOKEN, False, None),
    ("access token, trust with the OpenID exchange", urns.ACCESS_TOKEN, True, None),
    ("a JWT subject token is not the OpenID exchange", urns.JWT, False, None),
    ("ID token, trust with the OpenID exchange", urns.ID_TOKEN, True, None),
    ("ID token, trust without it: invalid_request", urns.ID_TOKEN, False, Err("invalid_request")),
]


@pytest.mark.parametrize("rule, subject_type, allow_id_token, expected", rows(ALLOWED_FORM))
def test_allowed_form(rule, subject_type, allow_id_token, expected):
    got = decide(policy.allowed_form, presented(subject_type), trust(allow_id_token=allow_id_token))
    assert same(got, expected)


# -- decide_scopes: rule 6, requested ∩ the access token's scopes ∩ the trust's, within the budget --
MANY = " ".join(f"patient/Observation.rs?code={i}" for i in range(scopes.MAX_SCOPES + 1))

DECIDE_SCOPES = [
    # rule, requested (None: absent), token scopes (None: no scope claim), trust scopes, expected grant
    ("all three bound the grant", "patient/Observation.rs patient/Condition.rs", "patient/*.rs",
     "patient/Observation.r patient/Condition.rs", "patient/Observation.r patient/Condition.rs"),
    ("an absent request grants what both bounds allow, in v2", None, "patient/*.read", "patient/Observation.rs",
     "patient/Observation.rs"),
    ("no scope claim: the trust alone bounds the request", "patient/Observation.rs", None, "patient/*.r",
     "patient/Observation.r"),
    ("no request and no scope claim: the trust's scopes", None, None, "patient/*.rs user/Patient.r",
     "patient/*.rs user/Patient.r"),
    ("a v1 request is answered in v1 when v1 says it exactly", "patient/Observation.read", "patient/*.rs",
     "patient/*.cruds", "patient/Observation.read"),
    ("a v1 request is answered in v2 when v1 cannot say it", "patient/Observation.read", "patient/*.r",
     "patient/*.cruds", "patient/Observation.r"),
    ("non-resource scopes are never granted", "openid fhirUser launch/patient patient/Observation.rs", None,
     "patient/*.rs", "patient/Observation.rs"),
    ("?param scopes survive against unfiltered bounds", "patient/Observation.rs?category=laboratory", None,
     "patient/*.rs", "patient/Observation.rs?category=laboratory"),
    ("nothing left after downscoping: invalid_scope", "patient/Observation.c", "patient/*.rs", "patient/*.cruds",
     Err("invalid_scope")),
    ("a scope claim that allows no resource scope: invalid_scope", "patient/Observation.rs", "openid profile",
     "patient/*.rs", Err("invalid_scope")),
    ("contexts never cross: invalid_scope", "user/Observation.rs", None, "patient/*.rs", Err("invalid_scope")),
    ("a grant over MAX_SCOPES scopes: invalid_scope", None, MANY, "patient/*.rs", Err("invalid_scope")),
]


@pytest.mark.parametrize("rule, requested, token, trust_scopes, expected", rows(DECIDE_SCOPES))
def test_decide_scopes(rule, requested, token, trust_scopes, expected):
    req = None if requested is None else scopes.parse(requested)
    token_scopes = None if token is None else scopes.parse_claim(token)
    got = decide(policy.decide_scopes, req, presented(token_scopes=token_scopes), trust(scope_text=trust_scopes))
    assert same(got if isinstance(got, Err) else got.format(), expected)


# -- without_patient: rule 7, no patient link, no patient scopes --
WITHOUT_PATIENT = [
    # rule, granted, expected
    ("patient scopes are dropped, the others kept", "patient/*.rs user/*.rs system/Patient.r",
     "user/*.rs system/Patient.r"),
    ("the spelling of what is kept is kept", "patient/*.read user/Observation.read", "user/Observation.read"),
    ("nothing but patient scopes: invalid_scope", "patient/Observation.rs patient/Condition.r", Err("invalid_scope")),
    ("no patient scope at all: unchanged", "user/Observation.rs", "user/Observation.rs"),
]


@pytest.mark.parametrize("rule, granted, expected", rows(WITHOUT_PATIENT))
def test_without_patient(rule, granted, expected):
    got = decide(policy.without_patient, scopes.parse(granted))
    assert same(got if isinstance(got, Err) else got.format(), expected)


# -- lifetime: the smallest of the service TTL, the trust's and target's caps, what remains of the
#    presented tokens and of the consent; below one second: invalid_request --
NOW = 1_000_000

LIFETIME = [
    # rule, ttl, trust max_ttl, target max_ttl, presented expires, consent expires, expected seconds
    ("the service TTL when nothing caps it", 300, None, None, None, None, 300),
    ("the presented token's remaining life", 300, None, None, NOW + 120, None, 120),
    ("a token outliving the TTL does not extend it", 300, None, None, NOW + 9999, None, 300),
    ("the trust's cap", 300, 60, None, NOW + 120, None, 60),
    ("the target's cap", 300, 60, 30, NOW + 120, None, 30),
    ("a cap of 0 is no cap", 300, 0, 0, None, None, 300),
    ("a token never outlives its consent", 300, None, None, NOW + 120, NOW + 10, 10),
    ("the consent alone caps it", 300, None, None, None, NOW + 200, 200),
    ("one second left is enough", 300, None, None, NOW + 1, None, 1),
    ("an expired presented token: invalid_request", 300, None, None, NOW, None, Err("invalid_request")),
    ("a presented token expired long ago: invalid_request", 300, None, None, NOW - 50, None, Err("invalid_request")),
    ("an expired consent: invalid_request", 300, None, None, NOW + 120, NOW - 1, Err("invalid_request")),
]


@pytest.mark.parametrize("rule, ttl, trust_max, target_max, expires, consent_expires, expected", rows(LIFETIME))
def test_lifetime(rule, ttl, trust_max, target_max, expires, consent_expires, expected):
    got = decide(policy.lifetime, ttl, trust(max_ttl=trust_max), NS(max_ttl=target_max), expires, NOW,
                 consent_expires)
    assert same(got, expected)
