"""Patient matching now lives in ``mapping/`` (patients.py, search.py); these names
stay importable from here for scripts written against the old module."""
from .mapping.patients import Decision, Mapped, Matcher, MatchingUnavailable, PatientMapper, make_matcher
from .mapping.search import (MAX_IDENTIFIERS, MAX_VALUE, MEMORY_SECONDS, SERVICE_ACTOR, WOULD_SEARCH, Identifier,
                             Malformed, memory_key, searchset_matches, usable_identifiers)

__all__ = ["Decision", "Identifier", "MAX_IDENTIFIERS", "MAX_VALUE", "MEMORY_SECONDS", "Malformed", "Mapped",
           "Matcher", "MatchingUnavailable", "PatientMapper", "SERVICE_ACTOR", "WOULD_SEARCH", "make_matcher",
           "memory_key", "searchset_matches", "usable_identifiers"]
