"""The delay set: retries and delivery delays wait in a Redis sorted set scored by due time.

A Celery countdown longer than the broker's visibility timeout is executed twice, and ETA tasks
sit in worker memory, so nothing here ever uses them (ARCHITECTURE rule 2). A mover republishes
what is due; the move is one Lua call (lua/move_due.lua), so two movers never publish the same
item twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from config.keys import RedisKeys, queue_for, task_name_for
from workers.broker.keys import queue_list
from workers.broker.scripts import load_script
from workers.broker.wire import TaskMessageEncoder, decode_task_args


class DelaySet:
    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        batch_size: int = 1,
        encoder: TaskMessageEncoder | None = None,
    ) -> None:
        """``batch_size`` > 1 (with an ``encoder``): the mover groups due deliveries of one
        kind into task messages of up to that many."""
        self.redis = client
        self.keys = keys
        self.batch_size = batch_size if encoder is not None else 1
        self.encoder = encoder
        self._move_due = load_script(client, "workers.stores", "move_due")
        self._move_batches = load_script(client, "workers.stores", "move_due_batches")

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
            if self.batch_size > 1:
                grouped, alone = self._move_grouped(queue, keys, now, limit)
                moved += grouped
                if not alone:
                    continue
            moved += int(self._move_due(keys=keys, args=[now, limit]))
        return moved

    def _move_grouped(
        self, queue: str, keys: list[str], now: float, limit: int
    ) -> tuple[int, bool]:
        """Move the due deliveries of ``queue`` in batch messages; returns how many moved and
        whether any due member was left to go alone (not a delivery of this queue's kind)."""
        due: list[bytes] = self.redis.zrangebyscore(  # type: ignore[assignment]
            keys[0], "-inf", now, start=0, num=limit
        )
        groups: dict[str, list[tuple[bytes, str, str]]] = {}
        alone = False
        for member in due:
            found = _delivery_of(member, queue)
            if found is None:
                alone = True
            else:
                groups.setdefault(found[0], []).append((member, found[1], found[2]))
        assert self.encoder is not None
        argv: list[Any] = []
        for kind, members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                if len(chunk) == 1:  # as it is: no batch of one
                    argv += [1, chunk[0][0], chunk[0][0]]
                    continue
                wire = self.encoder.encode_batch(
                    kind, [json for _, json, _ in chunk], [dest for _, _, dest in chunk]
                )
                argv += [len(chunk), *(member for member, _, _ in chunk), wire]
        moved = int(self._move_batches(keys=keys, args=argv)) if argv else 0
        return moved, alone

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


def _delivery_of(member: bytes, queue: str) -> tuple[str, str, str] | None:
    """(kind, envelope JSON, destination) when ``member`` is one delivery of ``queue``'s kind,
    the message of a single envelope; None for anything else (it moves as it is)."""
    try:
        headers, args = decode_task_args(member.decode())
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if len(args) != 1 or not isinstance(args[0], dict):
        return None
    kind, destination = args[0].get("kind"), args[0].get("destination")
    if not isinstance(kind, str) or not isinstance(destination, str):
        return None
    if headers.get("task") != task_name_for(kind) or queue_for(kind) != queue:
        return None
    return kind, json.dumps(args[0], separators=(",", ":")), destination
