"""Tests for token_exchange.scopes: the SMART scope algebra.

Table tests pin the product contract and SMART App Launch 2.2 examples;
hypothesis properties check the algebra against an independent model in
which a scope list denotes a set of (context, resource, letter, params)
operations over a small finite universe.
"""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from token_exchange.scopes import (
    Scope, ScopeError, ScopeSet, downscope, is_v1, parse, parse_scope,
)

NON_RESOURCE = ("openid", "fhirUser", "launch", "launch/patient", "offline_access")
LAB = "category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory"


def grant(requested, *others):
    """``downscope(requested, parse(o1), ...).format()`` -- the contract's shape."""
    return downscope(requested, *(parse(o) for o in others)).format()


# --------------------------------------------------------------------------
# Contract table
# --------------------------------------------------------------------------

CONTRACT = [
    ("patient/Observation.rs", "patient/*.rs", "patient/Observation.rs"),
    ("patient/Observation.read", "patient/*.rs", "patient/Observation.read"),
    ("patient/Observation.cruds", "patient/*.rs", "patient/Observation.rs"),
    ("patient/*.*", "patient/Observation.rs patient/Condition.r",
     "patient/Observation.rs patient/Condition.r"),
    ("patient/Observation.c", "patient/*.rs", ""),
    ("user/Observation.rs", "patient/*.rs", ""),
    ("patient/Observation.rs?category=laboratory", "patient/*.rs",
     "patient/Observation.rs?category=laboratory"),
    ("patient/Observation.rs", "patient/Observation.rs?category=laboratory",
     "patient/Observation.rs?category=laboratory"),
    ("patient/Observation.rs?category=a", "patient/Observation.rs?category=b", ""),
]


@pytest.mark.parametrize("requested, other, expected", CONTRACT)
def test_contract_table(requested, other, expected):
    assert grant(requested, other) == expected


@pytest.mark.parametrize("other", [
    "patient/*.cruds user/*.cruds system/*.cruds",
    "patient/*.* user/*.* system/*.*",
    "openid fhirUser launch/patient offline_access",
    "",
])
def test_non_resource_scopes_are_never_granted(other):
    assert grant("openid fhirUser launch/patient offline_access", other) == ""
    assert grant("openid fhirUser launch launch/patient offline_access patient/Observation.rs",
                 "openid fhirUser patient/*.rs") == "patient/Observation.rs"


def test_non_resource_scopes_are_not_parsed_as_resource_scopes():
    for tok in NON_RESOURCE:
        assert parse_scope(tok) is None
    assert parse(" ".join(NON_RESOURCE)).scopes == ()
    assert not parse(" ".join(NON_RESOURCE))


# --------------------------------------------------------------------------
# SMART App Launch 2.2 scope examples: parsing
# --------------------------------------------------------------------------

SMART_EXAMPLES = [
    # token, context, resource, v2 letters, params
    ("patient/Observation.rs", "patient", "Observation", "rs", ""),
    ("patient/*.rs", "patient", "*", "rs", ""),
    ("user/*.cruds", "user", "*", "cruds", ""),
    ("user/Observation.rs", "user", "Observation", "rs", ""),
    ("user/Appointment.cruds", "user", "Appointment", "cruds", ""),
    ("patient/Encounter.cu", "patient", "Encounter", "cu", ""),
    ("patient/Patient.r", "patient", "Patient", "r", ""),
    ("system/*.rs", "system", "*", "rs", ""),
    (f"patient/Observation.rs?{LAB}", "patient", "Observation", "rs", LAB),
    ("patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/"
     "observation-category|vital-signs", "patient", "Observation", "rs",
     "category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"),
    ("patient/Condition.rs?category=http://terminology.hl7.org/CodeSystem/"
     "condition-category|encounter-diagnosis", "patient", "Condition", "rs",
     "category=http://terminology.hl7.org/CodeSystem/condition-category|encounter-diagnosis"),
    # SMART v1 spellings
    ("patient/*.read", "patient", "*", "rs", ""),
    ("user/*.write", "user", "*", "cud", ""),
    ("system/*.*", "system", "*", "cruds", ""),
    ("patient/Observation.read", "patient", "Observation", "rs", ""),
    ("user/Patient.*", "user", "Patient", "cruds", ""),
]


@pytest.mark.parametrize("token, context, resource, letters, params", SMART_EXAMPLES)
def test_smart_examples_parse(token, context, resource, letters, params):
    s = parse_scope(token)
    assert s == Scope(context, resource, frozenset(letters), params)
    assert parse(token).scopes == (s,)


@pytest.mark.parametrize("token, context, resource, letters, params", SMART_EXAMPLES)
def test_smart_examples_format_round_trip(token, context, resource, letters, params):
    ss = parse(token)
    # A single v1 token is answered in v1, a v2 token in v2 -- i.e. as asked.
    assert ss.format() == token
    assert parse(ss.format()).scopes == ss.scopes


@pytest.mark.parametrize("v1, v2", [
    ("read", "rs"), ("write", "cud"), ("*", "cruds"),
])
def test_v1_words_equal_v2_letters(v1, v2):
    for ctx, res in itertools.product(("patient", "user", "system"), ("Observation", "*")):
        assert parse_scope(f"{ctx}/{res}.{v1}") == parse_scope(f"{ctx}/{res}.{v2}")


@pytest.mark.parametrize("token, expected", [
    ("patient/*.read", True), ("user/*.write", True), ("system/*.*", True),
    ("patient/Observation.read?category=laboratory", True),
    (f"patient/Observation.*?{LAB}", True),
    ("patient/Observation.rs", False), ("patient/*.cruds", False),
    ("patient/Observation.r", False), (f"patient/Observation.rs?{LAB}", False),
])
def test_is_v1_recognises_v1_spelling(token, expected):
    assert is_v1(token) is expected


# --------------------------------------------------------------------------
# SMART App Launch 2.2 examples: intersections
# --------------------------------------------------------------------------

SMART_INTERSECTIONS = [
    ("user/*.cruds", "user/Observation.rs", "user/Observation.rs"),
    ("user/*.write", "user/*.cruds", "user/*.write"),           # v1 in, v1 out
    ("user/*.write", "user/Patient.*", "user/Patient.write"),
    ("user/*.write", "user/*.rs", ""),                          # write ∩ read = ∅
    ("patient/*.read", "patient/Encounter.cu", ""),
    ("patient/Encounter.cu", "patient/*.cruds", "patient/Encounter.cu"),
    ("patient/Encounter.cu", "patient/*.write", "patient/Encounter.cu"),
    ("patient/Encounter.cu", "patient/Encounter.c", "patient/Encounter.c"),
    ("system/*.*", "system/*.rs", "system/*.read"),             # v1 request: rs said as read
    ("system/*.cruds", "system/*.read", "system/*.rs"),         # v2 request: read said as rs
    ("system/*.*", "system/*.read", "system/*.read"),
    ("system/*.*", "patient/*.* user/*.*", ""),
    (f"patient/Observation.rs?{LAB}", "patient/*.read", f"patient/Observation.rs?{LAB}"),
    (f"patient/Observation.rs?{LAB}", f"patient/Observation.r?{LAB}",
     f"patient/Observation.r?{LAB}"),
    (f"patient/Observation.rs?{LAB}", "patient/Condition.rs", ""),
    (f"patient/Observation.read?{LAB}", "patient/*.*", f"patient/Observation.read?{LAB}"),
    ("patient/*.rs", f"patient/Observation.rs?{LAB} patient/Condition.r",
     f"patient/Observation.rs?{LAB} patient/Condition.r"),
]


@pytest.mark.parametrize("requested, other, expected", SMART_INTERSECTIONS)
def test_smart_example_intersections(requested, other, expected):
    assert grant(requested, other) == expected


# --------------------------------------------------------------------------
# Individual rules
# --------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", list(itertools.permutations(("patient", "user", "system"), 2)))
def test_contexts_never_cross(a, b):
    assert grant(f"{a}/*.cruds", f"{b}/*.cruds") == ""
    assert grant(f"{a}/Observation.rs", f"{b}/Observation.rs") == ""
    assert parse_scope(f"{a}/*.*").intersect(parse_scope(f"{b}/*.*")) is None
    assert not parse_scope(f"{a}/Observation.r").within(parse_scope(f"{b}/*.*"))


def test_resource_wildcard_matches_any_type_and_keeps_the_specific_one():
    assert grant("patient/*.rs", "patient/Observation.cruds") == "patient/Observation.rs"
    assert grant("patient/Observation.cruds", "patient/*.rs") == "patient/Observation.rs"
    assert grant("patient/*.rs", "patient/*.r") == "patient/*.r"
    assert grant("patient/Observation.rs", "patient/Condition.rs") == ""


def test_param_scope_survives_only_against_no_params_or_identical_params():
    q = "patient/Observation.rs?category=laboratory"
    assert grant(q, "patient/Observation.rs") == q
    assert grant(q, "patient/*.rs") == q
    assert grant(q, q) == q
    assert grant(q, "patient/Observation.rs?category=vital-signs") == ""
    # Same filter written differently is compared literally: never wider.
    assert grant("patient/Observation.rs?a=1&b=2", "patient/Observation.rs?b=2&a=1") == ""
    assert grant(q, "patient/Condition.rs") == ""


def test_param_values_may_contain_pipe_colon_slash():
    tok = f"patient/Observation.rs?{LAB}"
    assert parse_scope(tok).params == LAB
    assert grant(tok, "patient/Observation.rs") == tok
    multi = "patient/Observation.rs?category=laboratory&code=http://loinc.org|1234-5"
    assert parse_scope(multi).params == "category=laboratory&code=http://loinc.org|1234-5"


def test_permissions_intersect_letterwise():
    assert grant("patient/Observation.cruds", "patient/Observation.cd") == "patient/Observation.cd"
    assert grant("patient/Observation.crs", "patient/Observation.rus") == "patient/Observation.rs"
    assert grant("patient/Observation.cu", "patient/Observation.ds") == ""


def test_grant_never_wider_than_any_input_examples():
    assert grant("patient/*.cruds", "patient/*.rs", "patient/Observation.cruds") == "patient/Observation.rs"
    assert grant("patient/*.cruds", "patient/Observation.rs", "patient/Condition.rs") == ""
    assert grant("user/*.cruds", "user/*.rs", "user/Observation.r user/Condition.s") == \
        "user/Observation.r user/Condition.s"


def test_absent_request_grants_everything_the_bounds_allow_in_v2():
    assert downscope(None, parse("patient/*.read")).format() == "patient/*.rs"
    assert downscope(None, parse("patient/*.* user/Observation.write")).format() == \
        "patient/*.cruds user/Observation.cud"
    assert downscope(None, parse("patient/*.read"), parse("patient/Observation.*")).format() == \
        "patient/Observation.rs"
    assert downscope(None, parse("openid fhirUser patient/*.rs")).format() == "patient/*.rs"
    assert downscope(None).format() == ""
    assert not downscope(None)


def test_empty_request_grants_nothing():
    assert grant("", "patient/*.*") == ""
    assert grant("   ", "patient/*.*") == ""


def test_request_without_bounds_is_just_the_request():
    assert downscope("patient/Observation.read openid").format() == "patient/Observation.read"


# -- v1 / v2 spelling of the answer -----------------------------------------

def test_v2_request_is_answered_in_v2():
    assert grant("patient/Observation.rs", "patient/*.read") == "patient/Observation.rs"
    assert grant("patient/*.cruds", "patient/*.*") == "patient/*.cruds"


def test_all_v1_request_is_answered_in_v1_when_v1_is_exact():
    assert grant("patient/*.read", "patient/*.*") == "patient/*.read"
    assert grant("patient/*.read user/*.write", "patient/*.rs user/*.cud") == \
        "patient/*.read user/*.write"
    assert grant("patient/*.*", "patient/*.cruds") == "patient/*.*"
    # non-resource scopes in the request do not make it a "mixed" request
    assert grant("openid fhirUser patient/*.read", "patient/Observation.rs") == \
        "patient/Observation.read"


def test_v1_request_falls_back_to_v2_when_v1_cannot_say_the_grant():
    assert grant("patient/*.read", "patient/Observation.r") == "patient/Observation.r"
    # one inexpressible scope switches the whole answer to v2
    assert grant("patient/*.read user/*.*", "patient/*.rs user/Observation.r") == \
        "patient/*.rs user/Observation.r"


def test_mixed_v1_v2_request_is_answered_in_v2():
    assert grant("patient/*.read user/*.rs", "patient/*.* user/*.*") == \
        "patient/*.rs user/*.rs"


def test_format_v1_merges_read_and_write_into_star():
    assert parse("patient/Observation.read patient/Observation.write").format() == \
        "patient/Observation.*"


# -- simplification -----------------------------------------------------------

def test_simplify_drops_duplicates_and_covered_scopes_keeping_order():
    assert parse("patient/Observation.rs patient/Observation.rs").format() == \
        "patient/Observation.rs"
    assert parse("patient/Observation.r patient/*.rs").format() == "patient/*.rs"
    assert parse("patient/*.rs patient/Observation.r").format() == "patient/*.rs"
    assert parse("patient/Observation.r?category=laboratory patient/Observation.rs").format() == \
        "patient/Observation.rs"
    assert parse("patient/Condition.r patient/Observation.s patient/Condition.s").format() == \
        "patient/Condition.rs patient/Observation.s"
    # a params scope is *not* covered by a different params scope nor vice versa
    assert parse("patient/Observation.rs?category=a patient/Observation.rs?category=b").format() == \
        "patient/Observation.rs?category=a patient/Observation.rs?category=b"
    # a *-scope is not absorbed by a specific one
    assert parse("patient/*.r patient/Observation.rs").format() == \
        "patient/*.r patient/Observation.rs"


def test_within_is_operation_set_inclusion():
    s = parse_scope
    assert s("patient/Observation.r").within(s("patient/*.rs"))
    assert s("patient/Observation.r?category=a").within(s("patient/Observation.rs"))
    assert s("patient/Observation.r?category=a").within(s("patient/Observation.r?category=a"))
    assert not s("patient/Observation.r").within(s("patient/Observation.r?category=a"))
    assert not s("patient/Observation.r?category=b").within(s("patient/Observation.r?category=a"))
    assert not s("patient/*.r").within(s("patient/Observation.r"))
    assert not s("patient/Observation.rs").within(s("patient/Observation.r"))


def test_patient_helpers():
    ss = parse("patient/Observation.rs user/Condition.r system/*.rs")
    assert ss.has_patient
    wp = ss.without_patient()
    assert not wp.has_patient
    assert wp.format() == "user/Condition.r system/*.rs"
    assert not parse("user/*.rs").has_patient
    assert parse("patient/*.read user/*.read").without_patient().format() == "user/*.read"


# -- malformed input ---------------------------------------------------------

MALFORMED = [
    "patient/Observation.xyz",
    "patient/observation.rs",       # lowercase type
    "patient/Observation.",         # no permissions
    "patient/Observation",          # no dot
    "patient/.rs",                  # no resource
    "patient/Observation.sr",       # letters out of cruds order
    "patient/Observation.rr",       # repeated letter
    "patient/Observation.rcs",
    "patient/Observation.reads",
    "patient/Observation.Read",
    "patient/Observation.rs?bad",   # param without '='
    "patient/Observation.rs?",      # empty query
    "patient/Observation.rs?a=",    # empty value
    "patient/Observation.rs?=b",    # empty name
    "patient/Observation.rs?a=b&",  # dangling '&'
    "patient/Observation.rs?a=b=c",
    "patient/Observation.rs?a=b?c=d",
    "patient/Observation.rs#frag",
    "patient/Obs-ervation.rs",
    "patient/Observation.rs/extra",
    "patient/*.rs.rs",
    "patient",
    "patient/",
    "user/" + "A" * 65 + ".rs",     # resource type too long
    'patient/Observation.rs?a="b"',  # '"' is not a scope-token character
    "patient/Observation.rs\\",     # '\' either
    '"openid"',
    "patient/Observation.rs\x00",
    "patient/Observation.rs\x7f",
    "patient/Observation.rs\t",
    "patient/Observation.rs\n",     # trailing newline ('$' would let this through)
    "patient/Observation.rs?a=b\n",
    "openid\n",
    "patient/Observ\u00e4tion.rs",  # non-ASCII
    "launch/patient\r",
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_scopes_raise_in_strict_mode(bad):
    with pytest.raises(ScopeError):
        parse(bad)
    with pytest.raises(ScopeError):
        parse(f"openid {bad} patient/Condition.rs")
    with pytest.raises(ScopeError):
        parse_scope(bad)
    with pytest.raises(ScopeError):
        downscope(f"patient/Condition.rs {bad}", parse("patient/*.*"))


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_scopes_are_skipped_when_lenient(bad):
    assert parse(bad, strict=False).scopes == ()
    ss = parse(f"openid {bad} patient/Condition.rs", strict=False)
    assert ss.format() == "patient/Condition.rs"


def test_scope_error_is_a_value_error():
    assert issubclass(ScopeError, ValueError)


def test_too_many_scopes_rejected_in_strict_mode_only():
    hundred = " ".join(f"patient/Observation.rs?n={i}" for i in range(100))
    assert len(parse(hundred).scopes) == 100
    # surplus spaces are not scopes
    assert len(parse("  " + hundred.replace(" ", "  ") + " ").scopes) == 100
    too_many = hundred + " openid"
    with pytest.raises(ScopeError):
        parse(too_many)
    assert len(parse(too_many, strict=False).scopes) == 100


def test_none_and_empty_parse_to_empty_set():
    for text in (None, "", " ", "   "):
        ss = parse(text)
        assert ss.scopes == () and not ss and ss.format() == "" and ss.v1 is False


# --------------------------------------------------------------------------
# Property-based tests against an operation-set model
# --------------------------------------------------------------------------
#
# Model. Universe: contexts CTX, resource types TYPES, letters "cruds",
# parameter values PARAM_UNIVERSE = {""} ∪ PARAMS ("" = unfiltered access).
# A scope ctx/res.perms[?p] denotes
#     {ctx} × (TYPES if res == "*" else {res}) × perms × ({p} if p else PARAM_UNIVERSE)
# and a scope list denotes the union over its resource scopes.
#
# Exactness: each scope denotes a *product* set, and the intersection of two
# products is the product of the per-coordinate intersections. Per coordinate
# the implementation is exact: context equal-or-nothing; resource
# {*}∩{R} = {R}, {R}∩{R'} = ∅; letters ∩; params ALL∩{p} = {p},
# {p}∩{p} = {p}, {p}∩{q} = ∅ (params are opaque values in this model --
# literal comparison). Union distributes over intersection, so the union of
# pairwise intersections is exactly the intersection of the unions; _simplify
# only merges equal keys and drops scopes contained in others, which keeps the
# denoted set. Hence property 2 is asserted as *equality*, not inclusion.
# (The only place exactness is "lost" is outside this model: "a=1&b=2" vs
# "b=2&a=1" are the same filter to a FHIR server but intersect to nothing
# here -- narrower, never wider, see
# test_param_scope_survives_only_against_no_params_or_identical_params.)
# Equality also implies "contexts never cross" (the model's context
# coordinate is intersected like the others); test_contexts_never_cross
# pins that rule with a table.

CTX = ("patient", "user", "system")
TYPES = ("Observation", "Condition", "Patient")
PARAMS = ("category=laboratory", "category=vital-signs", "code=http://loinc.org|1234-5")
PARAM_UNIVERSE = ("",) + PARAMS
V1_WORDS = {"read": "rs", "write": "cud", "*": "cruds"}


def _model_token(tok):
    """Independent interpretation of one generated token -> set of operations."""
    if tok.split("/", 1)[0] not in CTX:
        return set()
    ctx, rest = tok.split("/", 1)
    res, rest = rest.split(".", 1)
    perms, _, params = rest.partition("?")
    letters = V1_WORDS.get(perms, perms)
    types = TYPES if res == "*" else (res,)
    pvals = (params,) if params else PARAM_UNIVERSE
    return set(itertools.product((ctx,), types, letters, pvals))


def model_ops(text):
    """Operation set denoted by a scope string, without using scopes.py."""
    out = set()
    for tok in (text or "").split(" "):
        if tok:
            out |= _model_token(tok)
    return out


def ops(ss: ScopeSet):
    """Operation set denoted by a ScopeSet (from its Scope fields)."""
    out = set()
    for s in ss.scopes:
        types = TYPES if s.resource == "*" else (s.resource,)
        pvals = (s.params,) if s.params else PARAM_UNIVERSE
        out |= set(itertools.product((s.context,), types, s.perms, pvals))
    return out


# Every generatable token is precomputed, so each token costs hypothesis one
# draw (the properties run thousands of cases and must stay fast).
_V2_PERMS = tuple("".join(c for i, c in enumerate("cruds") if m >> i & 1) for m in range(1, 32))
_V1_PERMS = tuple(V1_WORDS)


def _tokens(perm_spellings):
    out = []
    for ctx, res, perms, param in itertools.product(
            CTX, TYPES + ("*",), perm_spellings, ("",) + PARAMS):
        tok = f"{ctx}/{res}.{perms}"
        out.append(f"{tok}?{param}" if param else tok)
    return tuple(out)


V2_TOKENS = _tokens(_V2_PERMS)
V1_TOKENS = _tokens(_V1_PERMS)
# Equal weight to v2 scopes, v1 scopes and non-resource scopes.
_any_token = st.one_of(st.sampled_from(V2_TOKENS), st.sampled_from(V1_TOKENS),
                       st.sampled_from(NON_RESOURCE))
scope_lists = st.lists(_any_token, max_size=6).map(" ".join)
v1_scope_lists = st.lists(st.one_of(st.sampled_from(V1_TOKENS), st.sampled_from(NON_RESOURCE)),
                          max_size=6).map(" ".join)

# Hypothesis costs ~2.5 ms per example here whatever the test does, so the
# five contract properties get 200 examples and the supplementary ones 100;
# the whole module stays within a few seconds. database=None: write nothing
# into the working tree.
PROPS = settings(max_examples=200, deadline=None, database=None)
MORE = settings(max_examples=100, deadline=None, database=None)


@MORE
@given(scope_lists)
def test_parse_denotes_what_the_text_says(a):
    assert ops(parse(a)) == model_ops(a)


@PROPS
@given(scope_lists, scope_lists)
def test_grant_never_wider_than_any_input(a, b):
    g = ops(downscope(a, parse(b)))
    assert g <= model_ops(a)
    assert g <= model_ops(b)


@PROPS
@given(scope_lists, scope_lists)
def test_grant_is_exactly_the_intersection(a, b):
    # Exact, not just included: see the model comment above.
    assert ops(downscope(a, parse(b))) == model_ops(a) & model_ops(b)


@PROPS
@given(scope_lists, scope_lists)
def test_intersection_is_commutative(a, b):
    assert ops(downscope(a, parse(b))) == ops(downscope(b, parse(a)))


@PROPS
@given(scope_lists)
def test_intersection_is_idempotent(a):
    assert ops(downscope(a, parse(a))) == ops(parse(a))
    assert ops(parse(a).intersect(parse(a))) == ops(parse(a))


@PROPS
@given(scope_lists, scope_lists)
def test_format_round_trips(a, b):
    for ss in (parse(a), downscope(a, parse(b)), downscope(None, parse(a))):
        text = ss.format()
        again = parse(text)  # strict: our own output is always well formed
        assert ops(again) == ops(ss)
        assert model_ops(text) == ops(ss)
        assert again.scopes == ss.scopes  # already simplified: a fixed point


@PROPS
@given(scope_lists, st.lists(scope_lists, min_size=1, max_size=4))
def test_chained_bounds_never_exceed_any_of_them(req, bounds):
    g = ops(downscope(req, *(parse(b) for b in bounds)))
    assert g <= model_ops(req)
    for b in bounds:
        assert g <= model_ops(b)
    # and it is exactly the intersection of them all
    expect = model_ops(req)
    for b in bounds:
        expect &= model_ops(b)
    assert g == expect


@MORE
@given(st.lists(scope_lists, min_size=1, max_size=4))
def test_absent_request_grants_intersection_of_bounds_in_v2(bounds):
    ss = downscope(None, *(parse(b) for b in bounds))
    expect = model_ops(bounds[0])
    for b in bounds[1:]:
        expect &= model_ops(b)
    assert ops(ss) == expect
    assert not any(is_v1(t) for t in ss.format().split())


@MORE
@given(scope_lists, scope_lists)
def test_only_resource_scopes_are_granted(a, b):
    for tok in downscope(a, parse(b)).format().split():
        assert tok.split("/", 1)[0] in CTX
        assert parse_scope(tok) is not None


@MORE
@given(st.one_of(scope_lists, v1_scope_lists), scope_lists)
def test_answer_spelling_follows_request_spelling(a, b):
    ss = downscope(a, parse(b))
    toks = ss.format().split()
    req = [t for t in a.split() if parse_scope(t) is not None]
    all_v1 = bool(req) and all(is_v1(t) for t in req)
    expressible = all(s.v1() is not None for s in ss.scopes)
    if all_v1 and expressible:
        assert all(is_v1(t) for t in toks)
    else:
        assert not any(is_v1(t) for t in toks)


@MORE
@given(scope_lists, st.lists(st.sampled_from(MALFORMED), min_size=1, max_size=3), st.randoms())
def test_lenient_parse_skips_only_the_malformed(a, bad, rnd):
    toks = a.split() + bad
    rnd.shuffle(toks)
    mixed = " ".join(toks)
    with pytest.raises(ScopeError):
        parse(mixed)
    assert ops(parse(mixed, strict=False)) == model_ops(a)


# Targets the v1 corner the spelling property above rarely reaches: an
# all-v1 request whose grant is only *partly* expressible in v1 (e.g.
# patient/*.read ∩ "patient/Observation.rs patient/Condition.r").
_v1_requests = st.lists(st.sampled_from(V1_TOKENS), min_size=1, max_size=6).map(" ".join)
_mixed_bounds = st.lists(st.one_of(st.sampled_from(V1_TOKENS), st.sampled_from(V2_TOKENS)),
                         min_size=2, max_size=8).map(" ".join)


@PROPS
@given(_v1_requests, _mixed_bounds)
def test_v1_answer_only_when_v1_expresses_the_whole_grant(a, b):
    ss = downscope(a, parse(b))
    toks = ss.format().split()
    if all(s.v1() is not None for s in ss.scopes):
        assert all(is_v1(t) for t in toks)
    else:
        assert not any(is_v1(t) for t in toks)
    assert ops(parse(ss.format())) == model_ops(a) & model_ops(b)


# --------------------------------------------------------------------------
# ScopeSet.covers and ScopeSet.union (the consent check's rules)
# --------------------------------------------------------------------------
#
# covers is rule 6's semantics, as the consent check uses it: every scope of
# the other set lies within ONE scope of this set (Scope.within). That is
# narrower than inclusion of operation sets: "patient/*.r patient/Observation.s"
# permits every operation of "patient/Observation.rs", but no single scope of
# it holds that scope, so it does not cover it (a row below pins this).

TYPES_20 = " ".join(f"patient/{t}.rs" for t in (
    "Observation", "Condition", "Patient", "Encounter", "Procedure", "Immunization", "AllergyIntolerance",
    "MedicationRequest", "DiagnosticReport", "CarePlan", "Goal", "Device", "Location", "Practitioner",
    "Organization", "Coverage", "Claim", "Specimen", "Media", "Flag"))
TYPES_10 = " ".join(TYPES_20.split()[:10])

COVERS = [
    # rule, self (the consent), other (the grant), expected
    ("a set covers itself", "patient/Observation.rs user/*.r", "patient/Observation.rs user/*.r", True),
    ("any set covers the empty set", "patient/Observation.r", "", True),
    ("the empty set covers the empty set", "", "", True),
    ("the empty set covers nothing else", "", "patient/Observation.r", False),
    ("a * scope covers each type", "patient/*.rs", "patient/Observation.r patient/Condition.s", True),
    ("a type does not cover *", "patient/Observation.rs", "patient/*.r", False),
    ("fewer letters do not cover more", "patient/Observation.r", "patient/Observation.rs", False),
    ("more letters cover fewer", "patient/Observation.cruds", "patient/Observation.rs", True),
    ("contexts never cross", "user/*.cruds", "patient/Observation.r", False),
    ("no params cover any params", "patient/Observation.rs", f"patient/Observation.r?{LAB}", True),
    ("params do not cover no params", f"patient/Observation.rs?{LAB}", "patient/Observation.r", False),
    ("params cover the same params", "patient/Observation.rs?category=a", "patient/Observation.r?category=a", True),
    ("params do not cover other params", "patient/Observation.rs?category=a", "patient/Observation.r?category=b",
     False),
    ("* without params covers a type with params", "patient/*.r", f"patient/Observation.r?{LAB}", True),
    ("each scope lies within ONE scope, not across two", "patient/*.r patient/Observation.s",
     "patient/Observation.rs", False),
    ("every scope of other must be covered", "patient/Observation.rs",
     "patient/Observation.r patient/Condition.r", False),
    ("the spelling (v1 or v2) does not matter", "patient/*.read", "patient/Observation.rs", True),
    ("many pairs (the index): twenty types cover ten", TYPES_20, TYPES_10, True),
    ("many pairs (the index): ten types do not cover twenty", TYPES_10, TYPES_20, False),
    ("many pairs (the index): a * scope among them", TYPES_10 + " user/*.rs",
     " ".join(t.replace("patient/", "user/") for t in TYPES_20.split()), True),
]


@pytest.mark.parametrize("rule, mine, other, expected", [pytest.param(*row, id=row[0]) for row in COVERS])
def test_covers_table(rule, mine, other, expected):
    assert parse(mine).covers(parse(other)) is expected


UNION = [
    # rule, self, other, expected union (v2), expected union as formatted by default
    ("other types are added after self's", "patient/Observation.r", "patient/Condition.r",
     "patient/Observation.r patient/Condition.r", "patient/Observation.r patient/Condition.r"),
    ("the same type joins its letters", "patient/Observation.r", "patient/Observation.s",
     "patient/Observation.rs", "patient/Observation.rs"),
    ("a scope within another is dropped", "patient/Observation.r", "patient/*.rs", "patient/*.rs", "patient/*.rs"),
    ("self's order comes first", "patient/Condition.r patient/Observation.r", "patient/Observation.r",
     "patient/Condition.r patient/Observation.r", "patient/Condition.r patient/Observation.r"),
    ("the empty set is the identity", "", "user/*.rs", "user/*.rs", "user/*.rs"),
    ("the empty set is the identity, on either side", "user/*.rs", "", "user/*.rs", "user/*.rs"),
    ("different params are both kept", "patient/Observation.r?category=a", "patient/Observation.r?category=b",
     "patient/Observation.r?category=a patient/Observation.r?category=b",
     "patient/Observation.r?category=a patient/Observation.r?category=b"),
    ("contexts stay apart", "patient/*.rs", "user/*.rs", "patient/*.rs user/*.rs", "patient/*.rs user/*.rs"),
    ("v1 on both sides stays v1", "patient/Observation.read", "patient/Condition.read",
     "patient/Observation.rs patient/Condition.rs", "patient/Observation.read patient/Condition.read"),
    ("v1 on one side only is v2", "patient/Observation.read", "patient/Condition.rs",
     "patient/Observation.rs patient/Condition.rs", "patient/Observation.rs patient/Condition.rs"),
]


@pytest.mark.parametrize("rule, a, b, v2, formatted", [pytest.param(*row, id=row[0]) for row in UNION])
def test_union_table(rule, a, b, v2, formatted):
    u = parse(a).union(parse(b))
    assert u.format(v1=False) == v2
    assert u.format() == formatted


def _covers_by_definition(a: ScopeSet, b: ScopeSet) -> bool:
    return all(any(g.within(c) for c in a.scopes) for g in b.scopes)


# Longer lists too, so that covers takes its indexed path (more than 64 pairs).
_long_scope_lists = st.lists(st.one_of(st.sampled_from(V2_TOKENS), st.sampled_from(V1_TOKENS)),
                             min_size=9, max_size=24).map(" ".join)
_any_scope_lists = st.one_of(scope_lists, _long_scope_lists)


@PROPS
@given(_any_scope_lists, _any_scope_lists)
def test_union_covers_both_sides_and_denotes_their_union(a, b):
    u = parse(a).union(parse(b))
    assert u.covers(parse(a)) and u.covers(parse(b))
    assert ops(u) == model_ops(a) | model_ops(b)
    assert parse(u.format()).scopes == u.scopes  # simplified: a fixed point


@PROPS
@given(_any_scope_lists, _any_scope_lists)
def test_covers_is_its_definition_and_sound(a, b):
    sa, sb = parse(a), parse(b)
    assert sa.covers(sb) == _covers_by_definition(sa, sb)
    if sa.covers(sb):
        assert ops(sb) <= ops(sa)
    assert sa.covers(sa)


@PROPS
@given(_any_scope_lists, _any_scope_lists)
def test_intersection_is_within_both_sides_and_is_the_covered_side(a, b):
    # The intersection permits nothing either side does not; where one side covers
    # the other, it permits exactly what the covered side does. (Not a property:
    # "each side covers the intersection". Simplifying joins the letters of pieces
    # that came from different scopes: "patient/Observation.c?category=a
    # patient/Observation.r" ∩ "patient/Observation.c patient/Observation.r
    # patient/Observation.ru?category=a" holds patient/Observation.cr?category=a,
    # within no single scope of the left side; see the "ONE scope" row of COVERS.)
    sa, sb = parse(a), parse(b)
    both = sa.intersect(sb)
    assert ops(both) <= ops(sa) and ops(both) <= ops(sb)
    if sa.covers(sb):
        assert ops(both) == ops(sb)
