"""Global rate limits and destination pauses, in Redis, shared by every worker on every host.

Celery's own ``rate_limit`` is per worker process, so it cannot hold a partner's limit. The
limiter is the `limits` package's moving-window strategy on Redis: it is maintained, its check
and hit are one Lua call, and a moving window never lets more than N through in any window of
the configured length (a fixed window lets up to 2N through across a boundary).
"""

from __future__ import annotations

import json
import time

import limits
import limits.storage
import limits.strategies
import redis

from config.keys import RedisKeys


class GlobalRateLimiter:
    def __init__(self, redis_url: str, keys: RedisKeys) -> None:
        self.keys = keys
        self.storage = limits.storage.storage_from_string(redis_url)
        self.strategy = limits.strategies.MovingWindowRateLimiter(self.storage)

    def acquire(self, destination: str, item: limits.RateLimitItem | None) -> float | None:
        """Take a slot. None when granted; otherwise seconds until one is expected to open."""
        if item is None:
            return None
        key = self.keys.rate_limit(destination)
        if self.strategy.hit(item, key):
            return None
        stats = self.strategy.get_window_stats(item, key)
        return max(0.01, float(stats.reset_time) - time.time())


class PauseRegistry:
    """A paused destination receives nothing until the pause ends (429 Retry-After, 401)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.redis = client
        self.keys = keys

    def pause(self, destination: str, seconds: float, reason: str) -> None:
        until = time.time() + seconds
        value = json.dumps({"until": until, "reason": reason})
        key = self.keys.paused(destination)
        # Never shorten an existing pause: keep the later of the two.
        current = self.paused_until(destination)
        if current is None or current < until:
            self.redis.set(key, value, pxat=int(until * 1000) + 1)

    def paused_until(self, destination: str) -> float | None:
        raw = self.redis.get(self.keys.paused(destination))
        if raw is None:
            return None
        until = float(json.loads(raw)["until"])
        return until if until > time.time() else None

    def resume(self, destination: str) -> bool:
        return bool(self.redis.delete(self.keys.paused(destination)))
