"""The one raw publish: every writer outside Celery's own API puts task messages on queues here.

produce(), the reconciler, the delay mover, the ledger sweep, dead-letter replay and the
requeue after a retry all publish messages from workers/broker/wire.py without going through
kombu (they need a claim, a ledger entry or a removal in the same atomic step, which kombu's
publish cannot give). In Python they call ``publish``; in Lua they ``--@include kombu_publish``
(workers/broker/lua/kombu_publish.lua). Both push exactly as kombu's Redis transport would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from config.keys import RedisKeys
from workers.broker.keys import queue_list
from workers.broker.replication import ReplicaWait, eval_then_wait
from workers.broker.scripts import load_script

log = structlog.get_logger("postback_relay.publish")


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
    postback's identity, kept for the export's retention).

    With a ``broker`` instance of its own (config/keys.py), no script can span both: the
    claims and ledger entries go to the state instance first, in one script, then the claimed
    messages to the broker, in one transaction. A state failure raises and nothing was
    accepted; a broker failure after it leaves the deliveries in the ledger, marked
    unpublished, and they go out once the broker is back (workers/stores/ledger.py): they are
    accepted (a message the ledger does not track is not, and the error is raised)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        lease_seconds: float,
        wait: ReplicaWait | None = None,
        *,
        broker: redis.Redis | None = None,
    ) -> None:
        """``wait``: replicas that must acknowledge each call's write (workers/broker/
        replication.py; with a broker instance of its own, the state's write, the one that
        keeps an accepted event); a call raises NotReplicated when too few did."""
        self.redis = client
        self.broker = client if broker is None else broker
        self.keys = keys
        self.lease_seconds = lease_seconds
        self.wait = wait
        if self.broker is client:
            self._script = load_script(client, "workers.broker", "enqueue_once")
        else:
            self._claim = load_script(client, "workers.broker", "enqueue_claim")

    def __call__(
        self, items: Sequence[Enqueue], ttl_seconds: int, batches: Sequence[Batch] = ()
    ) -> list[bool]:
        if not items:
            return []
        if self.broker is not self.redis:
            return self._claim_then_publish(items, ttl_seconds, batches)
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
        return self._run(self._script, keys, argv)

    def _run(self, script: Any, keys: list[str], argv: list[Any]) -> list[bool]:
        """``script``'s flags (new or duplicate, per item), after the replicas' acknowledgement
        when ``wait`` asks for one."""
        if self.wait is None:
            return [bool(flag) for flag in script(keys=keys, args=argv)]
        flags = eval_then_wait(self.redis, script, keys, argv, self.wait)
        if not all(flags):  # a duplicate: its claim was written by an earlier call
            self.wait.cover_earlier_writes(self.redis, self.keys)
        return [bool(flag) for flag in flags]

    def _claim_then_publish(
        self, items: Sequence[Enqueue], ttl_seconds: int, batches: Sequence[Batch]
    ) -> list[bool]:
        argv: list[Any] = [ttl_seconds, self.lease_seconds, len(items)]
        for item in items:
            argv += [repr(item.due), item.ledger_id, f"{item.queue}\n{item.wire}"]
        keys = [self.keys.ledger(), self.keys.ledger_messages(), *(i.claim_key for i in items)]
        flags = self._run(self._claim, keys, argv)
        claimed = [item for item, new in zip(items, flags, strict=True) if new]
        if not claimed:
            return flags
        try:
            with self.broker.pipeline(transaction=True) as pipe:
                for item, wire in _messages_to_send(items, flags, batches):
                    if item.delayed:
                        pipe.zadd(item.target_key, {wire: item.due})
                    else:
                        publish(pipe, item.target_key, wire)
                pipe.execute()
        except redis.RedisError as exc:
            if any(not item.ledger_id for item in claimed):
                raise
            # Marked unpublished, the delay mover publishes them as soon as the broker answers;
            # a delayed one is due at its delay's end in the ledger (its queue is not its place
            # until then). Best effort: failing that, the sweep takes them after the lease.
            now = [item.ledger_id for item in claimed if not item.delayed]
            later = {item.ledger_id: item.due for item in claimed if item.delayed}
            with contextlib.suppress(redis.RedisError), self.redis.pipeline() as pipe:
                if now:
                    pipe.sadd(self.keys.ledger_unpublished(), *now)
                if later:
                    pipe.zadd(self.keys.ledger(), later, xx=True)
                pipe.execute()
            log.warning("enqueue.broker_unavailable", deliveries=len(claimed), error=str(exc),
                        outcome="accepted: the ledger's sweep publishes them")  # fmt: skip
        return flags


def _messages_to_send(
    items: Sequence[Enqueue], flags: Sequence[bool], batches: Sequence[Batch]
) -> list[tuple[Enqueue, str]]:
    """What enqueue_once.lua publishes for these claims: a batch's message in place of its
    members' own when every member was new, else each new member's own message."""
    out: list[tuple[Enqueue, str]] = []
    sent: set[int] = set()
    for batch in batches:
        if all(flags[index] for index in batch.members):
            out.append((items[batch.members[0]], batch.wire))
            sent.update(batch.members)
    out += [
        (item, item.wire) for index, item in enumerate(items) if flags[index] and index not in sent
    ]
    return out
