"""In-process counters and a latency histogram, rendered as Prometheus text.

Each worker counts its own; Prometheus sums workers' series (one scrape per
worker behind the load balancer, or gunicorn with one worker per container).
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.exchanges = Counter()  # (outcome, error) -> n
        self.counters = Counter()
        self.latency = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0

    def exchange(self, outcome, error):
        with self._lock:
            self.exchanges[(outcome, error or "")] += 1

    def inc(self, name, n=1):
        with self._lock:
            self.counters[name] += n

    def observe(self, seconds):
        with self._lock:
            self.latency[bisect.bisect_left(BUCKETS, seconds)] += 1  # the first bucket with seconds <= le
            self.latency_sum += seconds

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP token_exchange_requests_total Token exchange decisions by outcome and error code.",
                     "# TYPE token_exchange_requests_total counter"]
            for (outcome, error), n in sorted(self.exchanges.items()):
                lines.append(f'token_exchange_requests_total{{outcome="{outcome}",error="{error}"}} {n}')
            lines += ["# HELP token_exchange_request_seconds Token endpoint latency.",
                      "# TYPE token_exchange_request_seconds histogram"]
            cum = 0
            for b, n in zip(BUCKETS, self.latency):
                cum += n
                lines.append(f'token_exchange_request_seconds_bucket{{le="{b}"}} {cum}')
            cum += self.latency[-1]
            lines.append(f'token_exchange_request_seconds_bucket{{le="+Inf"}} {cum}')
            lines.append(f"token_exchange_request_seconds_sum {self.latency_sum:.6f}")
            lines.append(f"token_exchange_request_seconds_count {cum}")
            for name in ("jwks_fetches", "jwks_fetch_failures", "db_errors"):
                lines += [f"# TYPE token_exchange_{name}_total counter",
                          f"token_exchange_{name}_total {self.counters[name]}"]
            return "\n".join(lines) + "\n"
