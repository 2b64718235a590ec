"""Prometheus metrics with prometheus_client, summed over every worker.

Under `token-exchange serve` the workers share one port, so a scrape reaches any
one of them: each worker writes its counts to memory-mapped files in a directory
the server owns (prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR),
and every scrape reports the sum over all workers, those that exited included, so
counters never go backwards while the service runs. Without that directory (one
process, or a WSGI server started by hand), the process's own registry is used.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> help: counters of things that happened outside the decisions.
EVENTS = {
    "jwks_fetches": "Successful fetches of an issuer's or a client's JWKS.",
    "jwks_fetch_failures": "Failed fetches of an issuer's or a client's JWKS.",
    "upstream_failures": "Outbound calls (EHR, vendor or FHIR server) without a usable answer.",
    "db_errors": "Requests answered 503 because the database could not be used.",
    "match_searches": "Patient searches at a target FHIR server.",
    "match_failures": "Patient matching that could not ask the target or the EHR (answered 503).",
    "match_busy": "Exchanges refused at once (503) because every matching slot was waiting on an upstream.",
    "consent_signin_starts": "Sign-ins at an EHR started from the consent pages (anonymous: each stores "
                             "nothing on the server; its state travels sealed in a cookie).",
    "consent_signin_refusals": "Callbacks from an EHR refused at the consent pages (no, an altered or a lapsed "
                               "sign-in cookie, another state, a replay, a failed or wrong sign-in).",
    "consent_sessions_stored": "Browser sessions stored by the consent pages: one per sign-in the EHR completed.",
}


class Metrics:
    """The service's metrics. Each Metrics owns its registry, so several apps in one
    process (tests) never share series."""

    def __init__(self):
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        registry = CollectorRegistry(auto_describe=True)
        self._registry = registry
        self._decisions = Counter("token_exchange_requests", "Token endpoint decisions by outcome and error code.",
                                  ["outcome", "error"], registry=registry)
        self._latency = Histogram("token_exchange_request_seconds", "Token endpoint latency.", buckets=BUCKETS,
                                  registry=registry)
        self._events = {name: Counter(f"token_exchange_{name}", help_, registry=registry)
                        for name, help_ in EVENTS.items()}
        self._by_decision = {}  # (outcome, error) -> the labelled child, looked up once
        self._users = Counter("token_exchange_user_mappings", "Users mapped onto a `mapped` target, by how "
                              "(table, matched, matched-stored, patient, none, ambiguous, blocked, unavailable).",
                              ["outcome"], registry=registry)
        tokens = Counter("token_exchange_tokens", "Tokens minted, by token_type: Bearer, or DPoP-bound (RFC 9449).",
                         ["token_type"], registry=registry)
        self._tokens = {t: tokens.labels(t) for t in ("Bearer", "DPoP")}

    def exchange(self, outcome, error):
        key = (outcome, error or "")
        child = self._by_decision.get(key)
        if child is None:
            child = self._by_decision[key] = self._decisions.labels(*key)
        child.inc()

    def user_mapping(self, outcome):
        self._users.labels(outcome).inc()
    def token_type(self, token_type: str):
        self._tokens[token_type].inc()

    def inc(self, name, n=1):
        self._events[name].inc(n)

    def observe(self, seconds):
        self._latency.observe(seconds)

    def render(self) -> bytes:
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry)
        return generate_latest(self._registry)
