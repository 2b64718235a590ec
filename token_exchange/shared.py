"""The optional Redis shared by instances (TOKEN_EXCHANGE_REDIS_URL), and its one client.

Never the only copy of anything that must not be lost: the database stays the
record of spent assertion jtis, configuration and revocations. Redis answers the
common case faster (replay fast path), carries change notifications, and holds
rate-limit counters shared by every worker. When Redis is unreachable every
method answers None, callers fall back to the database or to in-process state,
and Redis is left alone for a few seconds: slower, never a different answer.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time

log = logging.getLogger(__name__)
CHANNEL = "generation"


class Redis:
    """The shared Redis client: replay fast path, rate-limit counters, change
    notifications; answers None (and backs off) whenever Redis is not there."""

    BACKOFF = 5.0

    def __init__(self, url: str | None, database_url: str, prefix: str | None = None):
        self._redis = None
        if url:
            import redis
            self._errors = (redis.RedisError, OSError)
            self._redis = redis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
        # One namespace per deployment (its database), so unrelated deployments never mix.
        self.prefix = (prefix or "te:" + hashlib.sha256(database_url.encode()).hexdigest()[:16]) + ":"
        self._down_until = 0.0
        self._listener = None

    @property
    def enabled(self) -> bool:
        return self._redis is not None

    def _call(self, fn):
        if self._redis is None or time.monotonic() < self._down_until:
            return None
        try:
            return fn(self._redis)
        except self._errors as e:
            self._down_until = time.monotonic() + self.BACKOFF
            log.warning("redis unavailable; using the database alone", extra={"reason": type(e).__name__})
            return None

    # replay fast path ---------------------------------------------------------
    def jti_seen(self, client_id: str, jti: str) -> bool | None:
        key = self._jti_key(client_id, jti)
        return self._call(lambda r: bool(r.exists(key)))

    def jti_spent(self, client_id: str, jti: str, ttl: int) -> None:
        key = self._jti_key(client_id, jti)
        self._call(lambda r: r.set(key, 1, ex=max(1, ttl)))

    def _jti_key(self, client_id, jti):
        return self.prefix + "jti:" + hashlib.sha256(f"{client_id}\0{jti}".encode()).hexdigest()

    # rate-limit counters ----------------------------------------------------------
    def incr_window(self, name: str, window_s: int = 60) -> int | None:
        key = f"{self.prefix}rl:{name}:{int(time.time() // window_s)}"

        def go(r):
            pipe = r.pipeline()
            pipe.incr(key)
            pipe.expire(key, window_s + 5)
            return int(pipe.execute()[0])
        return self._call(go)

    # change notifications -----------------------------------------------------------
    def publish_change(self) -> None:
        self._call(lambda r: r.publish(self.prefix + CHANNEL, b"1"))

    def listen(self, on_change) -> None:
        """Start (once) a daemon thread that calls on_change() for every published change."""
        if self._redis is None or self._listener is not None:
            return
        self._listener = threading.Thread(target=self._listen, args=(on_change,), daemon=True,
                                          name="token-exchange-changes")
        self._listener.start()

    def _listen(self, on_change):
        while True:
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.prefix + CHANNEL)
                on_change()  # anything missed while not subscribed
                while True:
                    msg = pubsub.get_message(timeout=1.0)
                    if msg is not None:
                        on_change()
            except self._errors:
                time.sleep(self.BACKOFF)
