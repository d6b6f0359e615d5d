"""The delay set: retries and delivery delays wait in a Redis sorted set scored by due time.

A Celery countdown longer than the broker's visibility timeout is executed twice, and ETA tasks
sit in worker memory, so nothing here ever uses them (ARCHITECTURE rule 2). A mover republishes
what is due; the move is one Lua call (lua/move_due.lua), so two movers never publish the same
item twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from config.keys import RedisKeys
from workers.broker.keys import queue_list
from workers.broker.scripts import load_script
from workers.broker.wire import decode_task_args


class DelaySet:
    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.redis = client
        self.keys = keys
        self._move_due = load_script(client, "workers.stores", "move_due")

    def schedule(
        self, queue: str, wire_message: str, due: float, pipe: redis.client.Pipeline | None = None
    ) -> None:
        """Hold ``wire_message`` until ``due``; on ``pipe`` inside the caller's transaction."""
        target = pipe if pipe is not None else self.redis
        target.zadd(self.keys.delayed(queue), {wire_message: due})

    def move_due(self, queues: Iterable[str], now: float | None = None, limit: int = 1000) -> int:
        """Publish every message whose time has come; returns how many moved."""
        now = time.time() if now is None else now
        moved = 0
        for queue in queues:
            keys = [self.keys.delayed(queue), queue_list(queue)]
            moved += int(self._move_due(keys=keys, args=[now, limit]))
        return moved

    def release(self, queue: str, destination: str, now: float | None = None) -> int:
        """Make every parked delivery for ``destination`` due now (after a pause is lifted)."""
        key = self.keys.delayed(queue)
        due = time.time() if now is None else now
        released = 0
        for member, _score in self.redis.zscan_iter(key, count=500):
            try:
                _headers, args = decode_task_args(member.decode())
                target = args[0].get("destination") if args and isinstance(args[0], dict) else None
            except (ValueError, KeyError, IndexError):
                continue  # not ours to judge here; the mover will publish it when due
            if target == destination:
                released += int(self.redis.zadd(key, {member: due}, xx=True, ch=True) or 0)
        return released

    def depth(self, queue: str) -> int:
        return int(self.redis.zcard(self.keys.delayed(queue)))

    def next_due(self, queue: str) -> float | None:
        first = self.redis.zrange(self.keys.delayed(queue), 0, 0, withscores=True)
        return float(first[0][1]) if first else None
