"""The delivery ledger: every accepted delivery until it is finished, so none can be lost.

kombu's Redis transport takes a message with BRPOP and records it as unacknowledged in a
second round trip; if Redis dies between the two, the message is in neither place. The
ledger closes that gap from our side. produce() records each delivery with its message (in
the same Lua call that enqueues it); every start, retry or deferral moves its deadline on by
the lease; finishing (delivered, dead-lettered, skipped, aggregated) removes it. A sweep
(lua/ledger_sweep.lua) publishes again whatever passed its deadline without progress, once its
queue has stayed empty for the hold (a delivery behind a backlog, or in a worker's prefetch
buffer at the end of one, is waiting, not lost). Duplicates are possible (a message a dead
worker had prefetched comes back from kombu too), loss is not; every copy carries the same
idempotency key.

With batches (POSTBACK_RELAY_BATCH_SIZE > 1) a delivery travels in a message with others, but
its entry still holds its own single-envelope message: the sweep republishes each delivery
alone, in the form every release reads, and a batch message that comes back skips the
deliveries whose entry is gone (settled by an earlier run of it).

With a broker instance of its own (config/keys.py) the ledger is on the state instance and the
queues are not: the sweep asks the broker which queues stayed drained (lua/drained_queues.lua),
takes the due deliveries of those from the ledger, pushing their deadlines on
(lua/ledger_claim_due.lua), then publishes them. A publish that fails is taken again after the
lease. A delivery accepted (or replayed) while the broker was down is marked unpublished: its
message is on no queue and in no prefetch buffer, so the delay mover publishes it as soon as the
broker answers (``publish_unpublished``), without the sweep's hold.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import redis

from config.keys import RedisKeys
from workers.broker.keys import queue_list
from workers.broker.publish import publish
from workers.broker.scripts import load_script


class DeliveryLedger:
    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        lease_seconds: float,
        drained_hold_seconds: float = 0.0,
        broker: redis.Redis | None = None,
    ) -> None:
        """``client``: the state instance; ``broker``: the queues' instance, when it is
        another one. ``drained_hold_seconds``: how long a queue must stay empty before the
        sweep publishes its deliveries again (a worker's: its visibility timeout)."""
        self.redis = client
        self.broker = client if broker is None else broker
        self.keys = keys
        self.lease_seconds = lease_seconds
        self.drained_hold_seconds = drained_hold_seconds
        if self.broker is client:
            self._sweep = load_script(client, "workers.stores", "ledger_sweep")
        else:
            self._drained = load_script(self.broker, "workers.stores", "drained_queues")
            self._claim_due = load_script(client, "workers.stores", "ledger_claim_due")
            self._take = load_script(client, "workers.stores", "ledger_take_unpublished")

    def touch(self, pipe: Any, delivery_id: str, now: float) -> None:
        """A start: the delivery is alive; push its deadline on (only if it is tracked)."""
        pipe.zadd(self.keys.ledger(), {delivery_id: now + self.lease_seconds}, xx=True)

    def park(self, pipe: Any, delivery_id: str, queue: str, wire: str, due: float) -> None:
        """A retry or deferral: this is now the message to publish again, after ``due``."""
        pipe.zadd(self.keys.ledger(), {delivery_id: due + self.lease_seconds})
        pipe.hset(self.keys.ledger_messages(), delivery_id, f"{queue}\n{wire}")

    def settle(self, pipe: Any, delivery_id: str) -> None:
        pipe.zrem(self.keys.ledger(), delivery_id)
        pipe.hdel(self.keys.ledger_messages(), delivery_id)

    def sweep(self, now: float | None = None, limit: int = 500, queues: Sequence[str] = ()) -> int:
        """Publish again the deliveries past their deadline whose queue has stayed empty for
        the hold; returns how many. ``queues``: watched on every sweep (a worker's queues)."""
        now = time.time() if now is None else now
        # The script may touch only the queues it is given: read which ones the due deliveries
        # belong to first (a delivery due in between waits for the next sweep).
        due: list[bytes] = self.redis.zrangebyscore(  # type: ignore[assignment]
            self.keys.ledger(), "-inf", now, start=0, num=limit
        )
        values: list[bytes | None] = (
            self.redis.hmget(self.keys.ledger_messages(), due) if due else []  # type: ignore[assignment]
        )
        watch = dict.fromkeys(queues)
        for value in values:
            if value:
                watch[value.split(b"\n", 1)[0].decode()] = None
        if self.broker is not self.redis:
            return self._sweep_across(now, limit, list(watch), bool(due))
        return int(
            self._sweep(
                keys=[
                    self.keys.ledger(),
                    self.keys.ledger_messages(),
                    self.keys.ledger_drained(),
                    *map(queue_list, watch),
                ],
                args=[now, now + self.lease_seconds, limit, self.drained_hold_seconds, *watch],
            )
        )

    def _sweep_across(self, now: float, limit: int, queues: list[str], due: bool) -> int:
        """The sweep when the queues are on another instance than the ledger: every watched
        queue is looked at (so "empty since" stays fresh), the ledger only if anything is due
        (an entry whose message is gone, settled meanwhile, is dropped there)."""
        drained = self._drained(
            keys=[self.keys.ledger_drained(), *map(queue_list, queues)],
            args=[now, self.drained_hold_seconds, *queues],
        ) if queues else []  # fmt: skip
        if not due:
            return 0
        taken: list[bytes] = self._claim_due(
            keys=[self.keys.ledger(), self.keys.ledger_messages()],
            args=[now, now + self.lease_seconds, limit, *drained],
        )
        if not taken:
            return 0
        with self.broker.pipeline(transaction=True) as pipe:
            for value in taken:
                queue, wire = value.decode().split("\n", 1)
                publish(pipe, queue, wire)
                pipe.hdel(self.keys.ledger_drained(), queue)  # not empty any more
            pipe.execute()
        return len(taken)

    def publish_unpublished(self, limit: int = 500) -> int:
        """Publish the deliveries whose message never reached the broker (only with separate
        instances); returns how many. If the broker fails again they are marked again (else,
        with the state down too, the sweep takes them after the lease)."""
        if self.broker is self.redis:
            return 0
        taken: list[bytes] = self._take(
            keys=[self.keys.ledger_unpublished(), self.keys.ledger(), self.keys.ledger_messages()],
            args=[limit, time.time() + self.lease_seconds],
        )
        if not taken:
            return 0
        ids = taken[0::2]
        try:
            with self.broker.pipeline(transaction=True) as pipe:
                for value in taken[1::2]:
                    publish(pipe, *value.decode().split("\n", 1))
                pipe.execute()
        except redis.RedisError:
            with contextlib.suppress(redis.RedisError):
                self.redis.sadd(self.keys.ledger_unpublished(), *ids)
            raise
        return len(ids)

    def size(self) -> int:
        return int(self.redis.zcard(self.keys.ledger()))
