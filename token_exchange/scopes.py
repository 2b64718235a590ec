"""SMART on FHIR scope algebra: parse, intersect, format. Pure functions.

SMART App Launch 2.2 §"Scopes for requesting clinical data":
``<context>/<resource>.<permissions>[?param=value&...]`` where context is
``patient``, ``user`` or ``system``; resource a FHIR type or ``*``;
permissions the v2 letters ``c r u d s`` in that order, or the v1 words
``read`` (= ``rs``), ``write`` (= ``cud``) and ``*`` (= ``cruds``).

A scope denotes a set of permitted operations. Intersecting two scope lists
intersects those sets pairwise, so the result is never wider than either
side. Anything that is not a resource scope (``openid``, ``fhirUser``,
``launch/patient``, ``offline_access`` ...) is never passed on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

CONTEXTS = ("patient", "user", "system")
V2_ORDER = "cruds"
V1_TO_V2 = {"read": "rs", "write": "cud", "*": "cruds"}
V2_TO_V1 = {frozenset(v): k for k, v in V1_TO_V2.items()}

_RESOURCE_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<resource>\*|[A-Z][A-Za-z]{0,63})"
    r"\.(?P<perms>read|write|\*|c?r?u?d?s?)(?:\?(?P<params>[^?#\s]+))?\Z")
_PARAM = re.compile(r"^[A-Za-z0-9_.:-]+=[^&=]+\Z")
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
# (\Z, not $: $ also matches before a trailing newline, letting "...\n" through)
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+\Z")
_MAX_SCOPES = 100


class ScopeError(ValueError):
    """A scope string that is not well formed."""


@dataclass(frozen=True)
class Scope:
    context: str
    resource: str
    perms: frozenset
    params: str = ""  # the raw query after '?', compared exactly

    @property
    def is_patient(self) -> bool:
        return self.context == "patient"

    def v2(self) -> str:
        letters = "".join(c for c in V2_ORDER if c in self.perms)
        return self._spell(letters)

    def v1(self) -> str | None:
        word = V2_TO_V1.get(self.perms)
        return None if word is None else self._spell(word)

    def _spell(self, perms: str) -> str:
        text = f"{self.context}/{self.resource}.{perms}"
        return f"{text}?{self.params}" if self.params else text

    def intersect(self, other: Scope) -> Scope | None:
        """The operations both scopes permit, or None."""
        if self.context != other.context:
            return None  # contexts never cross
        if self.resource == "*":
            resource = other.resource
        elif other.resource in ("*", self.resource):
            resource = self.resource
        else:
            return None
        # A ?param scope survives only against the same resource scope with
        # no parameters or with identical ones.
        if self.params and other.params and self.params != other.params:
            return None
        perms = self.perms & other.perms
        if not perms:
            return None
        return Scope(self.context, resource, perms, self.params or other.params)

    def within(self, other: Scope) -> bool:
        """True when every operation this scope permits, ``other`` permits."""
        return (self.context == other.context
                and other.resource in ("*", self.resource)
                and self.perms <= other.perms
                and (not other.params or other.params == self.params))


@dataclass(frozen=True)
class ScopeSet:
    scopes: tuple  # of Scope
    v1: bool = False  # every resource scope was spelled in SMART v1

    def __bool__(self):
        return bool(self.scopes)

    @property
    def has_patient(self) -> bool:
        return any(s.is_patient for s in self.scopes)

    def without_patient(self) -> ScopeSet:
        return ScopeSet(tuple(s for s in self.scopes if not s.is_patient), self.v1)

    def intersect(self, other: ScopeSet) -> ScopeSet:
        out = []
        for a in self.scopes:
            for b in other.scopes:
                c = a.intersect(b)
                if c is not None:
                    out.append(c)
        return ScopeSet(_simplify(out), self.v1)

    def format(self) -> str:
        """v2 spelling; v1 when the set was asked for in v1 and v1 says it exactly."""
        return _format(self)

    def _format(self) -> str:
        if self.v1:
            words = [s.v1() for s in self.scopes]
            if all(words):
                return " ".join(words)
        return " ".join(s.v2() for s in self.scopes)


@lru_cache(maxsize=4096)
def _format(scope_set: ScopeSet) -> str:
    return scope_set._format()


def parse_scope(text: str) -> Scope | None:
    """One scope token -> Scope; None when it is not a resource scope.

    Raises ScopeError for a token that claims a SMART context but is malformed.
    """
    if not _SCOPE_TOKEN.match(text):
        raise ScopeError("a scope contains characters RFC 6749 does not allow")
    if text.split("/", 1)[0] not in CONTEXTS:
        return None  # openid, fhirUser, launch/patient, offline_access, ...
    m = _RESOURCE_SCOPE.match(text)
    if not m or m.group("perms") == "":
        raise ScopeError("malformed SMART scope; use context/Resource.perms, e.g. patient/Observation.rs")
    params = m.group("params") or ""
    if params and not all(_PARAM.match(p) for p in params.split("&")):
        raise ScopeError("malformed SMART scope parameters; use ?name=value")
    perms = m.group("perms")
    return Scope(m.group("context"), m.group("resource"), frozenset(V1_TO_V2.get(perms, perms)), params)


def is_v1(text: str) -> bool:
    return text.split("?", 1)[0].rsplit(".", 1)[-1] in V1_TO_V2


@lru_cache(maxsize=4096)
def parse(text: str | None, strict: bool = True) -> ScopeSet:
    """A space-separated scope string -> ScopeSet of its resource scopes.

    strict=False skips malformed tokens instead of raising: for scope claims in
    upstream tokens, whose vocabulary is the EHR's, not ours.
    """
    tokens = [t for t in (text or "").split(" ") if t]  # empty: repeated spaces
    if strict and len(tokens) > _MAX_SCOPES:
        raise ScopeError(f"too many scopes; at most {_MAX_SCOPES}")
    scopes, spellings = [], []
    for tok in tokens:
        if not tok:
            continue
        try:
            s = parse_scope(tok)
        except ScopeError:
            if strict:
                raise
            continue
        if s is not None:
            scopes.append(s)
            spellings.append(is_v1(tok))
    return ScopeSet(_simplify(scopes), bool(spellings) and all(spellings))


def _simplify(scopes) -> tuple:
    """Merge permissions of equal (context, resource, params), drop scopes
    another scope already covers; keep first-seen order."""
    merged: dict = {}
    for s in scopes:
        key = (s.context, s.resource, s.params)
        prev = merged.get(key)
        merged[key] = s if prev is None else Scope(s.context, s.resource, prev.perms | s.perms, s.params)
    items = list(merged.values())
    return tuple(s for i, s in enumerate(items)
                 if not any(j != i and s.within(o) and not (o.within(s) and j > i)
                            for j, o in enumerate(items)))


@lru_cache(maxsize=4096)
def downscope(requested: str | None, *bounds: ScopeSet) -> ScopeSet:
    """requested ∩ every bound (contract rule 6). Absent request: all the bounds allow."""
    result = parse(requested) if requested is not None else None
    for bound in bounds:
        result = bound if result is None else result.intersect(bound)
    if result is None:
        return ScopeSet(())
    return result if requested is not None else ScopeSet(result.scopes, False)
