"""Property-based fuzz of the DPoP header at POST /token: whatever it carries (text,
JWT-shaped junk, any JSON in its header and claims, a valid proof mutated), never a
5xx, and a token only for a proof that passes every check."""
from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, strategies as st

from test_fuzz import FUZZ  # the suite's hypothesis profiles (ci, default) and its per-request example count
from dpop_helpers import TOKEN_ENDPOINT, Prover, b64
from token_exchange.dpop import normalize_url

HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
                      max_size=120)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
                           st.text(max_size=20) | st.sampled_from(["POST", TOKEN_ENDPOINT, "dpop+jwt", "ES256"]),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(
                               st.text(max_size=5), children, max_size=3), max_leaves=8)
HEADER_KEYS = st.sampled_from(["typ", "alg", "jwk", "kid", "crit", "x"])
CLAIM_KEYS = st.sampled_from(["jti", "htm", "htu", "iat", "nonce", "ath", "x"])
KEY = Prover("ES256")


def check(exchange, value):
    r = exchange(headers={"DPoP": value})
    assert r.status_code < 500, r.get_data(as_text=True)
    body = r.get_json()
    return r, body


@given(value=HEADER_TEXT)
@FUZZ
def test_any_dpop_header_text_never_yields_a_5xx_or_a_token(exchange, value):
    r, body = check(exchange, value)
    assert r.status_code == 400 and body["error"] == "invalid_dpop_proof", body


@given(header=st.dictionaries(HEADER_KEYS, JSON_VALUES, max_size=5),
       claims=st.dictionaries(CLAIM_KEYS, JSON_VALUES, max_size=7), signature=st.binary(max_size=80))
@FUZZ
def test_any_json_in_a_proof_never_yields_a_5xx_or_a_token(exchange, header, claims, signature):
    value = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode()) + "." + b64(signature)
    r, body = check(exchange, value)
    assert r.status_code == 400 and body["error"] == "invalid_dpop_proof", body


@given(field=st.sampled_from(["typ", "alg", "jwk", "jti", "htm", "htu", "iat"]), value=JSON_VALUES)
@FUZZ
def test_a_valid_proof_with_one_field_changed_never_yields_a_5xx(exchange, field, value):
    good = {"typ": "dpop+jwt", "alg": "ES256", "jwk": KEY.jwk, "jti": None, "htm": "POST", "htu": TOKEN_ENDPOINT,
            "iat": int(time.time())}
    args = {k: v for k, v in good.items() if k != "jti"}
    args[field] = value if value is not None else "drop"
    if field == "jti":
        args["jti"] = value if isinstance(value, str) and value else "drop"
    r, body = check(exchange, KEY.proof(**args))
    if r.status_code == 200:  # only a change that leaves the proof valid may pass
        assert body["token_type"] == "DPoP"
        assert (value == good[field] or field == "jti"
                or (field == "typ" and isinstance(value, str) and value.lower() == "dpop+jwt")
                or (field == "htu" and isinstance(value, str) and normalize_url(value) == normalize_url(TOKEN_ENDPOINT))
                or (field == "iat" and isinstance(value, (int, float)) and abs(value - time.time()) <= 61)), (field, value)
    else:
        assert body["error"] == "invalid_dpop_proof", body


@pytest.mark.parametrize("cut", [1, 10, 50, 100, -1, -10])
def test_a_truncated_proof_is_invalid_dpop_proof(exchange, cut):
    proof = KEY.proof()
    r, body = check(exchange, proof[:cut] if cut > 0 else proof[:cut])
    assert body["error"] == "invalid_dpop_proof"
