"""produce() takes the first send time of each new delivery to a rate-limited destination.

A worker that found a delivery's turn far off parked it in the delay set: its message ran twice,
once to park and once to send, and under a binding limit nearly every delivery did. The producer
can take the turn instead, in the same call: a delivery whose turn is near goes on its queue
with the time on its envelope (its worker sleeps the rest), one whose turn is far off goes
straight into the delay set until shortly before it, so no worker runs it twice. The worker
honours a time it carries and takes a new one only if it went by (workers/delivery/pacing.py).

Only new deliveries take a time: a duplicate (its claim already taken) or a delivery to a paused
destination would spend a slot nobody uses and push every later turn back. Both are read in
one round trip first, with the limit's next free turn; an event produced twice at the same
moment may still spend one. And only when some delivery would be parked: a destination that
keeps up with its traffic is left to the workers, as before (see ``FirstTurns.take``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from config.destinations import Destinations
from config.keys import RedisKeys
from config.settings import Settings
from schemas.envelope import DeliveryEnvelope
from workers.delivery.pacing import park_lead, reserve_together, takes_send_times
from workers.delivery.ratelimit import GlobalRateLimiter, PauseRegistry, emission_interval_us
from workers.kinds import DestinationAdapter, adapter_for


@dataclass(frozen=True)
class FirstTurn:
    """A new delivery's send time, and where it waits for it."""

    send_at: float  # epoch seconds, Redis's clock: on its envelope as ``reserved_at``
    park_until: float | None  # far off: in the delay set until then (this host's clock)


class FirstTurns:
    def __init__(
        self, client: redis.Redis, keys: RedisKeys, destinations: Destinations, settings: Settings
    ) -> None:
        """``client``: the state instance's (claims, limits and pauses live there)."""
        self.redis = client
        self.keys = keys
        self.limiter = GlobalRateLimiter(client, keys)
        self.max_sleep = settings.rate_limit_max_sleep
        self.park_lead = park_lead(settings.rate_limit_max_sleep, settings.delay_mover_interval)
        adapters = (adapter_for(dest) for dest in destinations)
        self.adapters: dict[str, DestinationAdapter] = {
            a.destination.name: a for a in adapters if takes_send_times(a)
        }

    def take(self, envelopes: Sequence[DeliveryEnvelope]) -> list[FirstTurn | None]:
        """A turn for each envelope that is new and bound for a rate-limited destination that
        is not paused now, when its limit's queue of turns, with this call's deliveries, would
        reach past the sleep bound; None for the others (a worker reserves theirs, as before).

        Below that nobody would be parked, and a turn taken here for a delivery due now would
        go by before a worker picked it up (more than LATE_GRACE later): the worker would take
        a second one, spending two slots, and a destination's partner budget twice."""
        turns: list[FirstTurn | None] = [None] * len(envelopes)
        limited = [i for i, e in enumerate(envelopes) if e.destination in self.adapters]
        if not limited:
            return turns
        destinations = list(dict.fromkeys(envelopes[i].destination for i in limited))
        limit_keys = {i: self.adapters[envelopes[i].destination].rate_limit_key(envelopes[i])
                      for i in limited}  # fmt: skip
        distinct = list(dict.fromkeys(limit_keys.values()))
        with self.redis.pipeline(transaction=False) as pipe:
            for i in limited:
                pipe.exists(self.keys.dedupe(envelopes[i].delivery_id))
            for destination in destinations:
                pipe.get(self.keys.paused(destination))
            for limit_key in distinct:
                pipe.get(self.keys.rate_limit(limit_key))
            pipe.time()
            replies = pipe.execute()
        claimed = replies[: len(limited)]
        pauses = replies[len(limited) : len(limited) + len(destinations)]
        tats = replies[len(limited) + len(destinations) : -1]
        seconds, micros = replies[-1]
        redis_now = seconds + micros / 1e6
        paused = {
            d for d, raw in zip(destinations, pauses, strict=True)
            if PauseRegistry.parse(raw) is not None
        }  # fmt: skip
        next_turn = {
            k: max(redis_now, int(raw) / 1e6 if raw else 0.0)
            for k, raw in zip(distinct, tats, strict=True)
        }
        groups: dict[str, list[int]] = {}
        for i, taken in zip(limited, claimed, strict=True):
            if not taken and envelopes[i].destination not in paused:
                groups.setdefault(limit_keys[i], []).append(i)
        asking = []
        for limit_key, members in groups.items():
            item = self.adapters[envelopes[members[0]].destination].destination.rate_limit_item
            interval = 0.0 if item is None else emission_interval_us(item) / 1e6
            last = next_turn[limit_key] + (len(members) - 1) * interval
            if last - redis_now > self.max_sleep:
                asking += members
        if not asking:
            return turns
        times = reserve_together(
            self.limiter, [(self.adapters[envelopes[i].destination], envelopes[i]) for i in asking]
        )
        now, redis_now = time.time(), self.limiter.now()
        for i, send_at in zip(asking, times, strict=True):
            if send_at is None:
                continue
            wait = send_at - redis_now
            far = wait > self.max_sleep
            turns[i] = FirstTurn(send_at, now + wait - self.park_lead if far else None)
        return turns
