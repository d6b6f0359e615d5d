"""The one raw publish: every writer outside Celery's own API puts task messages on queues here.

produce(), the reconciler, the delay mover, the ledger sweep, dead-letter replay and the
requeue after a retry all publish messages from workers/broker/wire.py without going through
kombu (they need a claim, a ledger entry or a removal in the same atomic step, which kombu's
publish cannot give). In Python they call ``publish``; in Lua they ``--@include kombu_publish``
(workers/broker/lua/kombu_publish.lua). Both push exactly as kombu's Redis transport would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from config.keys import RedisKeys
from workers.broker.keys import queue_list
from workers.broker.replication import ReplicaWait, eval_then_wait
from workers.broker.scripts import load_script


def publish(pipe: Any, queue: str, wire: str) -> None:
    """Queue ``wire`` on ``queue`` in ``pipe`` (a client or a pipeline), as kombu would."""
    pipe.lpush(queue_list(queue), wire)


@dataclass(frozen=True)
class Enqueue:
    """A wire message for ``target_key`` (a queue, or a delay set when ``delayed``), sent only
    if ``claim_key`` was free; the claim expires after the caller's TTL."""

    claim_key: str
    target_key: str
    delayed: bool
    due: float
    wire: str
    ledger_id: str = ""  # the delivery id, when the delivery ledger should track it
    queue: str = ""  # the queue the message belongs to (target_key may be its delay set)


@dataclass(frozen=True)
class Batch:
    """One task message carrying the deliveries ``members`` (indexes into the items enqueued
    with it, all bound for one queue, none delayed). It replaces their own messages only when
    every member was new; otherwise each new member goes out alone, in its own ``wire``."""

    members: tuple[int, ...]
    wire: str


class EnqueueOnce:
    """Claim-then-enqueue for many messages in one atomic Lua call (one round trip).

    Used by produce() (claim: the delivery's dedupe key) and by the reconciler (claim: the
    postback's identity, kept for the export's retention)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        lease_seconds: float,
        wait: ReplicaWait | None = None,
    ) -> None:
        """``wait``: replicas that must acknowledge each call's write (workers/broker/
        replication.py); a call raises NotReplicated when too few did."""
        self._client = client
        self._script = load_script(client, "workers.broker", "enqueue_once")
        self.keys = keys
        self.lease_seconds = lease_seconds
        self.wait = wait

    def __call__(
        self, items: Sequence[Enqueue], ttl_seconds: int, batches: Sequence[Batch] = ()
    ) -> list[bool]:
        if not items:
            return []
        keys: list[str] = [self.keys.ledger(), self.keys.ledger_messages()]
        argv: list[Any] = [ttl_seconds, self.lease_seconds, len(items)]
        for item in items:
            target = item.target_key if item.delayed else queue_list(item.target_key)
            keys += [item.claim_key, target]
            argv += ["z" if item.delayed else "l", repr(item.due), item.wire, item.ledger_id,
                     item.queue]  # fmt: skip
        for batch in batches:
            # Lua counts from 1; each member's own wire stays its ledger entry's message.
            argv += [len(batch.members), *(index + 1 for index in batch.members), batch.wire]
        if self.wait is None:
            return [bool(flag) for flag in self._script(keys=keys, args=argv)]
        flags = eval_then_wait(self._client, self._script, keys, argv, self.wait)
        if not all(flags):  # a duplicate: its claim was written by an earlier call
            self.wait.cover_earlier_writes(self._client, self.keys)
        return [bool(flag) for flag in flags]
