"""produce()'s durability on a replicated Redis: wait for replicas to acknowledge its write.

Redis replicates asynchronously: the master answers a write before any replica has it, so a
failover (Sentinel promoting a replica after the master died) can lose writes the master had
already acknowledged, among them events whose produce() had returned. With
``POSTBACK_RELAY_PRODUCE_WAIT_REPLICAS=N`` the enqueue script is followed, on the same
connection and in the same round trip, by ``WAIT N timeout``: Redis answers once N replicas
have acknowledged everything this connection wrote, or when the timeout passes. Fewer
acknowledgements raise ``NotReplicated``, and the caller should produce the event again.

That is safe: the enqueue script writes the dedupe claim, the ledger entry and the message
together (one script, replicated as one transaction), so a new master has all of them or none.
Produced again within the dedupe window, an event the failover kept is reported as a
duplicate and not enqueued twice; one it lost is enqueued anew. A duplicate's own call writes
nothing, and WAIT only covers what its connection wrote, so a reply with duplicates is
followed by a tiny write (``RedisKeys.replication_mark``) and a second WAIT: replicas apply
writes in the master's order, so theirs covers the earlier write that claimed the event.

WAIT narrows the loss, it does not make Redis strongly consistent: Sentinel promotes the
replica it last saw with the most data, which normally is one that acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from config.keys import RedisKeys
from schemas.errors import PostbackRelayError

MARK_TTL_MS = 60_000


class NotReplicated(PostbackRelayError):
    """Fewer replicas than asked acknowledged produce()'s write within the timeout."""

    def __init__(self, acknowledged: int, required: int, timeout_ms: int) -> None:
        super().__init__(
            f"only {acknowledged} of the {required} replica(s) that "
            f"POSTBACK_RELAY_PRODUCE_WAIT_REPLICAS asks for acknowledged the write within "
            f"{timeout_ms} ms (POSTBACK_RELAY_PRODUCE_WAIT_TIMEOUT_MS). The event is on the "
            "master and may be delivered, or lost if the master fails before a replica has "
            "it; produce it again with the same event_id (safe: within the dedupe window it "
            "is enqueued once)"
        )
        self.acknowledged = acknowledged
        self.required = required
        self.timeout_ms = timeout_ms


@dataclass(frozen=True)
class ReplicaWait:
    """How many replicas must acknowledge a write, and how long to wait for them."""

    replicas: int
    timeout_ms: int

    def check(self, acknowledged: int) -> None:
        if acknowledged < self.replicas:
            raise NotReplicated(acknowledged, self.replicas, self.timeout_ms)

    def cover_earlier_writes(self, client: redis.Redis, keys: RedisKeys) -> None:
        """A write from this connection, then WAIT: the replicas' acknowledgement covers every
        write the master made before it (a duplicate's claim, written by another call)."""
        with client.pipeline(transaction=False) as pipe:
            pipe.set(keys.replication_mark(), 1, px=MARK_TTL_MS)
            pipe.wait(self.replicas, self.timeout_ms)
            _, acknowledged = pipe.execute()
        self.check(int(acknowledged))


def eval_then_wait(
    client: redis.Redis, script: Script, keys: Sequence[Any], args: Sequence[Any], wait: ReplicaWait
) -> Any:
    """``script`` and ``WAIT`` in one round trip on one connection; raises NotReplicated when
    too few replicas acknowledged (after the script ran: its result is then lost to the
    caller, who produces again)."""
    for _ in range(2):
        with client.pipeline(transaction=False) as pipe:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.wait(wait.replicas, wait.timeout_ms)
            result, acknowledged = pipe.execute(raise_on_error=False)
        if isinstance(result, NoScriptError):  # a restarted or new master: load, then again
            client.script_load(script.script)
            continue
        for reply in (result, acknowledged):
            if isinstance(reply, Exception):
                raise reply
        wait.check(int(acknowledged))
        return result
    raise NoScriptError(f"script {script.sha} not found after loading it")
