"""Global rate limits and destination pauses, in Redis, shared by every worker on every host.

Celery's own ``rate_limit`` is per worker process, so it cannot hold a partner's limit. A
delivery reserves its send time (GCRA, lua/reserve.lua) instead of asking yes or no: the old
moving window (the `limits` package) answered "no" to all but N a window, and each "no" cost a
Celery round trip to ask again later (4,190 of them for 1,500 deliveries at 50/s); its grants
also bunched at the start of each window. A reservation is one Lua call made once per
attempt (again only when a parked delivery came back after its slot), and spaces requests one
emission interval apart: "60000 per 15 minutes" is one request every 15 ms, not 60,000 at
once. `limits` still parses the ``rate_limit`` setting: its syntax is the documented one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import limits
import redis

from config.keys import RedisKeys
from workers.broker.scripts import load_script

# Extra requests a quiet destination may send at once, on top of the one it always may. 0:
# requests leave one emission interval apart, so no 1-s window holds more than the limit.
BURST = 0


@dataclass(frozen=True)
class Reservation:
    """A send time taken from a destination's shared limit; it is spent whether or not the
    request is then sent (or succeeds), as the partner would count it."""

    send_at: float  # epoch seconds on Redis's clock
    wait: float  # seconds from the reservation until send_at (0: at once)


def emission_interval_us(item: limits.RateLimitItem) -> int:
    """The gap between two requests under ``item``, in whole microseconds, rounded up: the
    rounding can only make the rate a hair slower than the limit, never faster."""
    return math.ceil(item.get_expiry() * 1_000_000 / item.amount)


class GlobalRateLimiter:
    def __init__(self, client: redis.Redis, keys: RedisKeys, burst: int = BURST) -> None:
        """``client``: the state instance's (workers/redis_clients.py), a worker's sized to its
        concurrency."""
        self.keys = keys
        self.burst = burst
        self.redis = client
        self._reserve = load_script(self.redis, "workers.delivery", "reserve")
        self._tighten = load_script(self.redis, "workers.delivery", "budget_tighten")
        # Redis's clock minus ours, learnt from each reservation: a parked delivery compares
        # its reserved time with Redis's clock, not with a host clock that may differ.
        self._offset: float | None = None

    def tighten(self, destination: str, remaining: int, reset_at: float) -> None:
        """Record what the partner says is left until ``reset_at`` (epoch seconds)."""
        now = time.time()
        if reset_at > now:
            self._tighten(
                keys=[self.keys.server_budget(destination)],
                args=[max(0, remaining), int(reset_at * 1000), int(now * 1000)],
            )

    def reserve(
        self,
        key: str,
        item: limits.RateLimitItem | None,
        server_budget: bool = False,
        max_wait: float | None = None,
    ) -> Reservation | None:
        """Take the next send time under ``key``'s limit (``item``) and, with
        ``server_budget``, the partner's announced budget. None when neither applies. With
        ``max_wait``: a send time further off is returned (its ``wait`` says how far) but not
        taken, so a caller that refuses the request spends nothing of the limit."""
        taken = self.reserve_many(key, item, 1, server_budget, max_wait)
        return None if taken is None else taken[0]

    def reserve_many(
        self,
        key: str,
        item: limits.RateLimitItem | None,
        count: int,
        server_budget: bool = False,
        max_wait: float | None = None,
    ) -> list[Reservation] | None:
        """``count`` consecutive send times in one round trip (a batch's deliveries to one
        limit key), in order. None when neither a limit nor the partner's budget applies."""
        if item is None and not server_budget:
            return None
        interval = 0 if item is None else emission_interval_us(item)
        args = [interval, interval * self.burst, 1 if server_budget else 0, count]
        if max_wait is not None:
            args.append(math.floor(max_wait * 1_000_000))
        now_us, *times = self._reserve(
            keys=[self.keys.rate_limit(key), self.keys.server_budget(key)], args=args
        )
        self._offset = now_us / 1e6 - time.time()
        return [Reservation(t / 1e6, max(0.0, (t - now_us) / 1e6)) for t in times]

    def now(self) -> float:
        """Redis's clock (epoch seconds), the one reservations are in."""
        if self._offset is None:
            seconds, micros = self.redis.time()
            self._offset = seconds + micros / 1e6 - time.time()
        return time.time() + self._offset


# How stale this process's view of a destination's pause may be just before a send. With
# batches, a worker has up to concurrency x batch size deliveries under way; those not yet on
# the wire (sleeping to their rate-limit slot, waiting for a connection) look again here
# before they go, so another worker's 429 holds them back within this long, and this
# worker's own at once. At most one GET per destination per interval per process.
PAUSE_VIEW_MAX_AGE = 0.1


class PauseRegistry:
    """A paused destination receives nothing until the pause ends (429 Retry-After, 401)."""

    def __init__(
        self, client: redis.Redis, keys: RedisKeys, max_age: float = PAUSE_VIEW_MAX_AGE
    ) -> None:
        self.redis = client
        self.keys = keys
        self.max_age = max_age
        self._pause = load_script(client, "workers.delivery", "pause")
        # destination -> (when read, end of its pause or None): this process's recent view.
        self._view: dict[str, tuple[float, float | None]] = {}

    def pause(self, destination: str, seconds: float, reason: str) -> bool:
        """Pause for ``seconds`` from now, unless a pause that ends later is already set;
        True when this pause was stored."""
        now = time.time()
        until = now + seconds
        value = json.dumps({"until": until, "reason": reason})
        stored = bool(
            self._pause(
                keys=[self.keys.paused(destination)],
                args=[repr(until), value, int(until * 1000) + 1],
            )
        )
        if stored:  # this process's own deliveries stop at once, without reading it back
            self._view[destination] = (now, until)
        else:
            self._view.pop(destination, None)  # a longer pause is stored: read it next time
        return stored

    def note(self, destination: str, until: float | None) -> None:
        """Take a pause just read elsewhere (a batch's start writes read every destination's)
        as this process's view of ``destination``."""
        self._view[destination] = (time.time(), until)

    def current(self, destination: str) -> float | None:
        """The end of ``destination``'s pause as this process saw it at most ``max_age``
        ago (read again when older): the check made right before a request goes out."""
        now = time.time()
        seen = self._view.get(destination)
        if seen is None or now - seen[0] > self.max_age:
            seen = (now, self.paused_until(destination))
            self._view[destination] = seen
        until = seen[1]
        return until if until is not None and until > now else None

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
        self._view.pop(destination, None)
        return bool(self.redis.delete(self.keys.paused(destination)))
