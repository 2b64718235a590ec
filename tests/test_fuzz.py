"""Property-based fuzz of POST /token: no input yields a 5xx, and no request
that is not fully valid yields a token."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import AT, IDT, JWT_T, TE, VENDOR_SECRET, post_token
from fakes import TARGET, TARGET2

settings.register_profile("ci", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("default", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

NAMES = ["grant_type", "subject_token", "subject_token_type", "actor_token", "actor_token_type", "resource",
         "audience", "scope", "requested_token_type", "client_id", "client_secret", "client_assertion",
         "client_assertion_type", "patient", "x"]
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
VALUES = st.one_of(text, st.sampled_from([TE, AT, IDT, JWT_T, TARGET, TARGET2, "hospital-b", "patient/*.rs",
                                          "patient/Observation.rs?x=y", "user/*.cruds", "openid",
                                          "urn:ietf:params:oauth:token-type:refresh_token", "a.b.c", ""]))


@given(pairs=st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=12),
       auth=st.sampled_from([None, ("vendor", VENDOR_SECRET), ("vendor", "x"), ("", ""), ("other", "y" * 40)]))
@settings(deadline=None)
def test_no_input_yields_5xx_or_a_token_without_valid_tokens(http, pairs, auth):
    # the subject and actor tokens here are never validly signed, so nothing may be minted
    r = post_token(http, [(k, v) for k, v in pairs], auth=auth)
    assert r.status_code < 500, r.get_data(as_text=True)
    body = r.get_json()
    assert "access_token" not in body and body["error"]


@given(mutation=st.sampled_from(["drop", "dup", "swap", "truncate", "flip"]), which=st.integers(0, 6),
       junk=text)
@settings(max_examples=200, deadline=None)
def test_mutated_valid_requests_never_5xx_and_mint_only_when_valid(http, ehr, mutation, which, junk):
    fields = [("grant_type", TE), ("subject_token", ehr.access_token()), ("subject_token_type", AT),
              ("actor_token", ehr.id_token()), ("actor_token_type", IDT), ("resource", TARGET),
              ("scope", "patient/Observation.rs")]
    i = which % len(fields)
    name, value = fields[i]
    if mutation == "drop":
        fields.pop(i)
    elif mutation == "dup":
        fields.append((name, value))
    elif mutation == "swap":
        fields[i] = (name, junk)
    elif mutation == "truncate":
        fields[i] = (name, value[: len(value) // 2])
    else:
        # flip a middle character (a JWT's last base64 character may carry only padding bits)
        mid = len(value) // 2
        fields[i] = (name, value[:mid] + ("A" if value[mid] != "A" else "B") + value[mid + 1:])
    r = post_token(http, fields)
    assert r.status_code < 500
    if r.status_code == 200:
        # only mutations that leave a fully valid request may succeed
        assert (mutation == "drop" and name in ("scope", "actor_token", "actor_token_type")) or \
               (mutation == "swap" and name == "scope") or (mutation == "flip" and name == "scope") or \
               (mutation == "truncate" and name == "scope") or \
               (mutation == "dup" and name == "resource"), (mutation, name, r.get_json())
