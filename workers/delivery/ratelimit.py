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
from workers.broker.scripts import load_script


class GlobalRateLimiter:
    def __init__(self, redis_url: str, keys: RedisKeys, client: redis.Redis | None = None) -> None:
        """``client``: share its connection pool (a worker's, sized to its concurrency)
        instead of opening two pools of its own."""
        self.keys = keys
        self.storage = (
            limits.storage.storage_from_string(redis_url)
            if client is None
            else limits.storage.RedisStorage(redis_url, connection_pool=client.connection_pool)
        )
        self.strategy = limits.strategies.MovingWindowRateLimiter(self.storage)
        self.redis = client if client is not None else redis.Redis.from_url(redis_url)
        self._take_from_budget = load_script(self.redis, "workers.delivery", "budget_take")
        self._tighten = load_script(self.redis, "workers.delivery", "budget_tighten")

    def tighten(self, destination: str, remaining: int, reset_at: float) -> None:
        """Record what the partner says is left until ``reset_at`` (epoch seconds)."""
        now = time.time()
        if reset_at > now:
            self._tighten(
                keys=[self.keys.server_budget(destination)],
                args=[max(0, remaining), int(reset_at * 1000), int(now * 1000)],
            )

    def acquire(
        self, destination: str, item: limits.RateLimitItem | None, server_budget: bool = False
    ) -> float | None:
        """Take a slot. None when granted; otherwise seconds until one is expected to open."""
        if server_budget:
            wait_ms = int(self._take_from_budget(keys=[self.keys.server_budget(destination)]))
            if wait_ms >= 0:
                return max(0.01, wait_ms / 1000)
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
        self._pause = load_script(client, "workers.delivery", "pause")

    def pause(self, destination: str, seconds: float, reason: str) -> bool:
        """Pause for ``seconds`` from now, unless a pause that ends later is already set;
        True when this pause was stored."""
        until = time.time() + seconds
        value = json.dumps({"until": until, "reason": reason})
        return bool(
            self._pause(
                keys=[self.keys.paused(destination)],
                args=[repr(until), value, int(until * 1000) + 1],
            )
        )

    def paused_until(self, destination: str) -> float | None:
        return self.parse(self.redis.get(self.keys.paused(destination)))

    @staticmethod
    def parse(raw: bytes | str | None, now: float | None = None) -> float | None:
        """The end of a pause from its stored value (read in a caller's pipeline), or None."""
        if raw is None:
            return None
        until = float(json.loads(raw)["until"])
        return until if until > (time.time() if now is None else now) else None

    def resume(self, destination: str) -> bool:
        return bool(self.redis.delete(self.keys.paused(destination)))
