"""SMART on FHIR scope algebra: parse, intersect, cover, unite, format. Pure functions.

SMART App Launch 2.2 §"Scopes for requesting clinical data":
``<context>/<resource>.<permissions>[?param=value&...]`` where context is
``patient``, ``user`` or ``system``; resource a FHIR type or ``*``;
permissions the v2 letters ``c r u d s`` in that order, or the v1 words
``read`` (= ``rs``), ``write`` (= ``cud``) and ``*`` (= ``cruds``).

A scope denotes a set of permitted operations. Intersecting two scope lists
intersects those sets pairwise, so the result is never wider than either
side; one list covers another when each of the other's scopes lies within one
of its own. Each rule is written once: the grammar in ``_read`` (and its
spelling in ``_spell``), intersection in ``Scope.intersect``, inclusion in
``Scope.within``; the fast paths and indexes only choose which scopes to ask.
Anything that is not a resource scope (``openid``, ``fhirUser``,
``launch/patient``, ``offline_access`` ...) is never passed on.

Bounded work (docs/SECURITY.md, "Resource model"): every scope string is
bounded in length and count before it is split, an intersection stops once it
would produce more than ``MAX_WORK`` scopes, and a grant lists at most
``MAX_SCOPES``; beyond a budget ``ScopeBudgetError`` says what to ask for.
Intersection and simplification index the scopes by (context, resource type),
so they cost O(inputs + output), not O(|A| x |B|). Nothing here is cached by
request text: the memos are a ``ScopeSet``'s own index (the trust's long-lived
sets build theirs once), ``parse_claim``'s, keyed by short issuer-signed scope
claims (and consents' stored scopes), and ``downscope``'s, keyed by small parsed
requests and their bounds.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

CONTEXTS = ("patient", "user", "system")
V2_ORDER = "cruds"
V1_TO_V2 = {"read": "rs", "write": "cud", "*": "cruds"}
V2_TO_V1 = {frozenset(v): k for k, v in V1_TO_V2.items()}

#: Budgets. A request, a trust and a grant list at most MAX_SCOPES scopes; an
#: upstream token's scope claim at most MAX_CLAIMED_SCOPES (EHRs list many).
MAX_SCOPES = 100
MAX_CLAIMED_SCOPES = 256
MAX_SCOPE_LENGTH = 512  # characters in one scope
MAX_SCOPE_TEXT = 16 * 1024  # characters in one space-separated scope string
MAX_WORK = 1000  # distinct scopes one intersection may produce before simplification

_RESOURCE_SCOPE = re.compile(
    r"(?P<context>patient|user|system)/(?P<resource>\*|[A-Z][A-Za-z]{0,63})"
    r"\.(?P<perms>read|write|\*|c?r?u?d?s?)(?:\?(?P<params>[^?#\s]+))?")
_PARAM = re.compile(r"[A-Za-z0-9_.:-]+=[^&=]+")
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ); fullmatch, so a
# trailing newline never slips through as it would before "$".
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_SCOPE_TEXT = re.compile(r"[\x21\x23-\x5b\x5d-\x7e ]*")  # a whole string of well-formed tokens

# Every permission spelling -> its letter set, and every letter set -> its v2
# spelling: constant tables, so parsing and formatting build no sets.
_LETTER_SETS = ["".join(c for i, c in enumerate(V2_ORDER) if m >> i & 1) for m in range(1, 32)]
_PERMS = {letters: frozenset(letters) for letters in _LETTER_SETS}
_PERMS.update({word: _PERMS[letters] for word, letters in V1_TO_V2.items()})
_V2_SPELLING = {frozenset(letters): letters for letters in _LETTER_SETS}


class ScopeError(ValueError):
    """A scope string that is not well formed."""


class ScopeBudgetError(ScopeError):
    """A scope string, or the result of an intersection, over its budget."""


class Scope(NamedTuple):
    context: str
    resource: str
    perms: frozenset
    params: str = ""  # the raw query after '?', compared exactly

    @property
    def is_patient(self) -> bool:
        return self.context == "patient"

    def v2(self) -> str:
        return _spell(self.context, self.resource, _letters(self.perms), self.params)

    def v1(self) -> str | None:
        word = V2_TO_V1.get(self.perms)
        return None if word is None else _spell(self.context, self.resource, word, self.params)

    # The two rules of the algebra. Every intersection, coverage and simplification
    # below calls these; the indexes only choose which pairs to ask.
    def intersect(self, other: Scope) -> Scope | None:
        """The operations both scopes permit, or None."""
        context, resource, perms, params = self
        o_context, o_resource, o_perms, o_params = other
        if context != o_context:
            return None  # contexts never cross
        if resource == "*":
            resource = o_resource
        elif o_resource != "*" and o_resource != resource:
            return None
        # A ?param scope survives only against the same resource scope with
        # no parameters or with identical ones.
        if params and o_params and params != o_params:
            return None
        perms = perms & o_perms
        if not perms:
            return None
        return _new(Scope, (context, resource, perms, params or o_params))

    def within(self, other: Scope) -> bool:
        """True when every operation this scope permits, ``other`` permits."""
        return (self.context == other.context
                and other.resource in ("*", self.resource)
                and self.perms <= other.perms
                and (not other.params or other.params == self.params))


def _spell(context: str, resource: str, perms: str, params: str) -> str:
    """A scope's text: the grammar written out (parsing reads it in ``_read``)."""
    text = f"{context}/{resource}.{perms}"
    return f"{text}?{params}" if params else text


def _letters(perms: frozenset) -> str:
    """The v2 letters of a permission set, in cruds order."""
    return _V2_SPELLING.get(perms) or "".join(c for c in V2_ORDER if c in perms)


def _joined(a: Scope, b: Scope) -> Scope:
    """Two scopes of the same (context, resource, params) as one: the permissions of both."""
    return a if b.perms <= a.perms else _new(Scope, (a.context, a.resource, a.perms | b.perms, a.params))


class ScopeSet:
    """A simplified tuple of resource scopes (no scope within another)."""
    __slots__ = ("scopes", "v1", "_index", "_text")

    def __init__(self, scopes: tuple = (), v1: bool = False):
        self.scopes = scopes
        self.v1 = v1  # every resource scope was spelled in SMART v1
        self._index = self._text = None

    def __eq__(self, other):
        return isinstance(other, ScopeSet) and self.scopes == other.scopes and self.v1 == other.v1

    def __hash__(self):
        return hash((self.scopes, self.v1))

    def __repr__(self):
        return f"ScopeSet({self.scopes!r}, v1={self.v1})"

    def __bool__(self):
        return bool(self.scopes)

    def __len__(self):
        return len(self.scopes)

    @property
    def has_patient(self) -> bool:
        for s in self.scopes:
            if s[0] == "patient":
                return True
        return False

    def without_patient(self) -> ScopeSet:
        return ScopeSet(tuple(s for s in self.scopes if s.context != "patient"), self.v1)

    def intersect(self, other: ScopeSet) -> ScopeSet:
        """self ∩ other, listed in self's order, then other's. Raises ScopeBudgetError
        when it would produce more than MAX_WORK distinct scopes."""
        return ScopeSet(_intersect(self.scopes, other), self.v1)

    def covers(self, other: ScopeSet) -> bool:
        """Rule 6 semantics: every scope of ``other`` lies within one of self's
        (``Scope.within``), so whatever ``other`` permits, self permits. The empty
        set is covered by any set."""
        mine, index = self.scopes, None
        if len(mine) * len(other.scopes) > _SMALL:  # many pairs: ask only the (at most
            index = self.index()  # four) scopes of self that g may lie within
        for g in other.scopes:
            if index is None:
                held = mine
            else:
                ci = index.get(g.context)
                held = () if ci is None else [mine[pos] for pos in ci.holders(g)]
            for c in held:
                if g.within(c):
                    break
            else:
                return False
        return True

    def union(self, other: ScopeSet) -> ScopeSet:
        """self ∪ other, simplified, in self's order, then other's: what either permits.
        In v1 only when both sides were."""
        return ScopeSet(_simplify(self.scopes + other.scopes), self.v1 and other.v1)

    def format(self, v1: bool | None = None) -> str:
        """v2 spelling; v1 when the set was asked for in v1 (or ``v1=True``) and v1
        says it exactly. ``v1=False``: always v2. The text as asked for is kept with
        the set (a memoised grant is spelled once)."""
        if v1 is None:
            if self._text is None:
                self._text = self._spelled(self.v1)
            return self._text
        return self._spelled(v1)

    def _spelled(self, v1: bool) -> str:
        if v1:
            words = [s.v1() for s in self.scopes]
            if all(words):
                return " ".join(words)
        return " ".join([_spell(c, r, _letters(p), q) for c, r, p, q in self.scopes])

    def index(self) -> dict:
        """context -> _ContextIndex, built on first use and kept with the set."""
        if self._index is None:
            index = {}
            for pos, s in enumerate(self.scopes):
                ci = index.get(s.context)
                if ci is None:
                    ci = index[s.context] = _ContextIndex()
                ci.add(pos, s)
            self._index = index
        return self._index


_EMPTY = ScopeSet(())
_new = tuple.__new__  # Scope(...) without the generated __new__'s call overhead
_SMALL = 64  # pairs below which asking pair by pair beats building an index


class _ContextIndex:
    """One context's scopes of a simplified set, by what they can meet. In a
    simplified set (context, resource, params) is unique, so a scope with
    params ``p`` on resource ``R`` meets at most the four keys (R|*, ""|p)."""
    __slots__ = ("keyed", "by_resource", "star_by_perms", "plain_by_perms", "by_params", "positions")

    def __init__(self):
        self.keyed = {}  # (resource, params) -> position
        self.by_resource = {}  # resource -> [positions], any params
        self.star_by_perms = {}  # perms -> [positions] of "*" scopes, any params
        self.plain_by_perms = {}  # perms -> [positions] of typed scopes without params
        self.by_params = {}  # params -> [positions] of typed scopes with those params
        self.positions = []

    def add(self, pos: int, s: Scope) -> None:
        self.keyed[(s.resource, s.params)] = pos
        self.by_resource.setdefault(s.resource, []).append(pos)
        self.positions.append(pos)
        if s.resource == "*":
            self.star_by_perms.setdefault(s.perms, []).append(pos)
        elif s.params:
            self.by_params.setdefault(s.params, []).append(pos)
        else:
            self.plain_by_perms.setdefault(s.perms, []).append(pos)

    def candidates(self, x: Scope) -> list:
        """Positions of the scopes x may meet (resource and params compatible;
        groups whose permissions are disjoint from x's are skipped whole)."""
        keyed, perms = self.keyed, x.perms
        if x.resource != "*":
            if x.params:
                keys = ((x.resource, ""), (x.resource, x.params), ("*", ""), ("*", x.params))
                return [keyed[k] for k in keys if k in keyed]
            found = list(self.by_resource.get(x.resource, ()))
            for p, group in self.star_by_perms.items():
                if p & perms:
                    found += group
            return found
        if not x.params:
            return list(self.positions)
        found = [keyed[k] for k in (("*", ""), ("*", x.params)) if k in keyed]
        for p, group in self.plain_by_perms.items():
            if p & perms:
                found += group
        found += self.by_params.get(x.params, ())
        return found

    def holders(self, x: Scope) -> list:
        """Positions of the scopes x may lie within: (x's resource or *, no params or x's)."""
        keyed = self.keyed
        keys = {(x.resource, x.params), (x.resource, ""), ("*", ""), ("*", x.params)}
        return [keyed[k] for k in keys if k in keyed]


def _intersect(a: tuple, other: ScopeSet) -> tuple:
    """a ∩ other, simplified: Scope.intersect over the pairs that may meet, listed in
    a's order, then other's. A handful of pairs are all asked; more meet only through
    other's index, O(|a| + |b| + output) for simplified inputs (a "*" scope meeting
    each typed scope once), stopping past MAX_WORK scopes."""
    b, meet, out = other.scopes, Scope.intersect, []
    if len(a) * len(b) <= _SMALL:
        for x in a:
            context = x[0]
            for y in b:
                if y[0] == context:  # the pairs of one context (as the index groups them)
                    c = meet(x, y)
                    if c is not None:
                        out.append(c)
    else:
        index, keys = other.index(), set()
        for x in a:
            ci = index.get(x.context)
            if ci is None:
                continue
            found = ci.candidates(x)
            found.sort()  # other's order
            for pos in found:
                c = meet(x, b[pos])
                if c is not None:
                    out.append(c)
                    keys.add((c.resource, c.context, c.params))
            if len(keys) > MAX_WORK:
                raise ScopeBudgetError(f"The scopes asked for would grant more than {MAX_SCOPES} scopes; "
                                       "ask for fewer scopes (fewer ?param scopes or resource types).")
    return _simplify(out) if len(out) > 1 else tuple(out)


# -- the grammar --------------------------------------------------------------------------
def _read(tok: str) -> tuple | None:
    """The SMART scope grammar, read in this one place: a token of RFC 6749
    characters -> (Scope, spelled in v1); None when it is not a resource scope
    (``openid``, ``fhirUser``, ``launch/patient``, ...), of any length. Raises
    ScopeError for a token that claims a SMART context but is malformed, and
    ScopeBudgetError for one longer than MAX_SCOPE_LENGTH."""
    m = _RESOURCE_SCOPE.fullmatch(tok) if len(tok) <= MAX_SCOPE_LENGTH else None
    if m is not None:
        context, resource, perms, params = m.groups()
        if perms and (params is None or all(_PARAM.fullmatch(p) for p in params.split("&"))):
            return _new(Scope, (context, resource, _PERMS[perms], params or "")), perms in V1_TO_V2
    if tok.partition("/")[0] not in CONTEXTS:
        return None
    if len(tok) > MAX_SCOPE_LENGTH:
        raise ScopeBudgetError(f"a scope is longer than {MAX_SCOPE_LENGTH} characters")
    if m is None or not m["perms"]:
        raise ScopeError("malformed SMART scope; use context/Resource.perms, e.g. patient/Observation.rs")
    raise ScopeError("malformed SMART scope parameters; use ?name=value")


def _token(text: str) -> tuple | None:
    """_read for a token of any characters: bounded, then checked, then read."""
    if len(text) > MAX_SCOPE_LENGTH:
        raise ScopeBudgetError(f"a scope is longer than {MAX_SCOPE_LENGTH} characters")
    if not _SCOPE_TOKEN.fullmatch(text):
        raise ScopeError("a scope contains characters RFC 6749 does not allow")
    return _read(text)


def parse_scope(text: str) -> Scope | None:
    """One scope token -> Scope; None when it is not a resource scope.

    Raises ScopeError for a token that claims a SMART context but is malformed.
    """
    found = _token(text)
    return None if found is None else found[0]


def is_v1(text: str) -> bool:
    return text.split("?", 1)[0].rsplit(".", 1)[-1] in V1_TO_V2


def parse(text: str | None, strict: bool = True, limit: int | None = None) -> ScopeSet:
    """A space-separated scope string -> ScopeSet of its resource scopes.

    strict=False skips malformed tokens instead of raising: for scope claims in
    upstream tokens, whose vocabulary is the EHR's, not ours. Either way a string
    over its budget (MAX_SCOPE_TEXT characters; ``limit`` scopes, by default
    MAX_SCOPES when strict and MAX_CLAIMED_SCOPES when not) raises
    ScopeBudgetError before any scope is parsed.
    """
    if not text:
        return _EMPTY
    if " " not in text and len(text) <= MAX_SCOPE_LENGTH and _SCOPE_TOKEN.fullmatch(text):
        try:  # one scope: the usual request
            found = _read(text)
        except ScopeError:
            found = None  # raised (or skipped) below, in its place
        if found is not None:
            return ScopeSet((found[0],), found[1])
    if len(text) > MAX_SCOPE_TEXT:
        raise ScopeBudgetError(f"the scope string is longer than {MAX_SCOPE_TEXT} characters")
    tokens = text.split(" ")
    if "" in tokens:
        tokens = [t for t in tokens if t]  # empty: repeated spaces
    if limit is None:
        limit = MAX_SCOPES if strict else MAX_CLAIMED_SCOPES
    if len(tokens) > limit:
        raise ScopeBudgetError(f"too many scopes; at most {limit}")
    # A whole string of well-formed characters: no token needs its own character check.
    read = _read if _SCOPE_TEXT.fullmatch(text) is not None else _token
    scopes, all_v1 = [], True
    for tok in tokens:
        try:
            found = read(tok)
        except ScopeError:
            if strict:
                raise
            continue
        if found is not None:
            scopes.append(found[0])
            all_v1 = all_v1 and found[1]
    if not scopes:
        return _EMPTY
    return ScopeSet(_simplify(scopes) if len(scopes) > 1 else tuple(scopes), all_v1)


def parse_claim(text: str | None) -> ScopeSet:
    """The scopes of a verified upstream token (its signed scope claim, or its
    issuer's introspection answer), or of a consent the service stored: lenient,
    within MAX_CLAIMED_SCOPES. An app's tokens carry the same few claim strings
    exchange after exchange, so short ones (at most _CLAIM_MEMO_TEXT characters)
    are memoised, at most _CLAIM_MEMO entries. The key is trusted and bounded:
    issuer-signed or self-written text, never request text."""
    if text is not None and len(text) <= _CLAIM_MEMO_TEXT:
        return _parse_claim_memo(text)
    return parse(text, strict=False)


_CLAIM_MEMO_TEXT = 512
_CLAIM_MEMO = 256


@lru_cache(maxsize=_CLAIM_MEMO)
def _parse_claim_memo(text: str) -> ScopeSet:
    return parse(text, strict=False)


def _simplify(scopes) -> tuple:
    """Merge permissions of equal (context, resource, params), drop scopes
    within another (Scope.within); keep first-seen order. O(n): once equal keys
    are merged, only (R|*, ""|params) of the same context can hold a scope."""
    if len(scopes) < 2:
        return tuple(scopes)
    if len(scopes) == 2:  # the usual size: decide the pair directly
        a, b = scopes
        if a.context == b.context and a.resource == b.resource and a.params == b.params:
            return (_joined(a, b),)
        if b.within(a):
            return (a,)
        return (b,) if a.within(b) else (a, b)
    merged: dict = {}
    for s in scopes:
        key = (s.context, s.resource, s.params)
        prev = merged.get(key)
        merged[key] = s if prev is None else _joined(prev, s)
    out = []
    for (context, resource, params), s in merged.items():
        for key in ((context, resource, ""), (context, "*", ""), (context, "*", params)):
            o = merged.get(key)
            if o is not None and o is not s and s.within(o):
                break
        else:
            out.append(s)
    return tuple(out)


_DOWNSCOPE_MEMO_SCOPES = 8  # requests of at most this many scopes...
_DOWNSCOPE_MEMO_PARAMS = 64  # ...whose ?param parts are this short...
_DOWNSCOPE_MEMO = 1024  # ...are memoised, this many at most (about a megabyte at worst)


def downscope(requested: str | ScopeSet | None, *bounds: ScopeSet) -> ScopeSet:
    """requested ∩ every bound (contract rule 6). Absent request: all the bounds allow.

    Raises ScopeError for a malformed request, ScopeBudgetError when the grant
    would list more than MAX_SCOPES scopes. Apps ask for the same few scope strings
    again and again: a small request (a few short scopes) against the same bounds
    (verified tokens' and trusts' scope sets) is answered from a memo of at most
    _DOWNSCOPE_MEMO entries, so its memory stays bounded whatever requests carry
    (errors are never memoised)."""
    if requested is None or (isinstance(requested, ScopeSet) and len(requested.scopes) <= _DOWNSCOPE_MEMO_SCOPES
                             and all(len(x.params) <= _DOWNSCOPE_MEMO_PARAMS for x in requested.scopes)):
        return _downscope_memo(requested, bounds)
    return _downscope(requested, *bounds)


@lru_cache(maxsize=_DOWNSCOPE_MEMO)
def _downscope_memo(requested, bounds) -> ScopeSet:
    return _downscope(requested, *bounds)


def _downscope(requested: str | ScopeSet | None, *bounds: ScopeSet) -> ScopeSet:
    if requested is None:
        if not bounds:
            return _EMPTY
        result, v1 = bounds[0].scopes, False  # all the bounds allow, said in v2
        bounds = bounds[1:]
    else:
        if isinstance(requested, str):
            requested = parse(requested)
        result, v1 = requested.scopes, requested.v1
    for bound in bounds:
        result = _intersect(result, bound)
    if len(result) > MAX_SCOPES:
        raise ScopeBudgetError(f"The grant would list more than {MAX_SCOPES} scopes; "
                               "ask for fewer scopes (fewer ?param scopes or resource types).")
    return ScopeSet(result, v1)
