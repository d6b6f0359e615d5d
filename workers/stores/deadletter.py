"""The dead-letter store: deliveries that will not be retried, with their whole history.

Redis has no dead-letter exchange (a rejected message is simply gone), so the store is ours:
a hash of entries by delivery id, a sorted index by time for listing and --since, and a count
per destination for metrics and health. Every change to the three is one Lua call
(lua/deadletter_*.lua).

A replay publishes the entry's fresh message and removes the entry in one step. With a broker
instance of its own (config/keys.py) that step cannot reach the queue: the entry is exchanged
for a ledger entry holding the message (lua/deadletter_to_ledger.lua), then the message is
published; if the broker is down, it is published once the broker is back (ledger.py).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import redis
import structlog

from config.destinations import Destinations
from config.keys import RedisKeys, queue_for
from schemas.deadletter import DeadLetter
from schemas.envelope import DeliveryEnvelope
from workers.broker.keys import queue_list
from workers.broker.publish import publish
from workers.broker.scripts import load_script
from workers.broker.wire import TaskMessageEncoder
from workers.delivery.ratelimit import GlobalRateLimiter

log = structlog.get_logger("postback_relay.deadletter")


@dataclass
class ReplayReport:
    replayed: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)
    not_replayable: dict[str, str] = field(default_factory=dict)  # id -> why


class DeadLetterStore:
    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        broker: redis.Redis | None = None,
        ledger_lease_seconds: float = 600,
    ) -> None:
        """``client``: the state instance; ``broker``: the queues' instance, when it is
        another one (a replayed delivery is then tracked by the ledger with this lease)."""
        self.redis = client
        self.broker = client if broker is None else broker
        self.keys = keys
        self.ledger_lease_seconds = ledger_lease_seconds
        self._add = load_script(client, "workers.stores", "deadletter_add")
        self._remove = load_script(client, "workers.stores", "deadletter_remove")
        if self.broker is client:
            self._replay = load_script(client, "workers.stores", "deadletter_replay")
        else:
            self._to_ledger = load_script(client, "workers.stores", "deadletter_to_ledger")

    def _keys(self) -> list[str]:
        return [
            self.keys.dead_letters(),
            self.keys.dead_letter_index(),
            self.keys.dead_letter_counts(),
        ]

    def add(self, entry: DeadLetter) -> None:
        self._add(
            keys=self._keys(),
            args=[
                entry.delivery_id,
                entry.model_dump_json(),
                entry.dead_at.timestamp(),
                entry.destination,
            ],
        )

    def add_envelope(
        self,
        envelope: DeliveryEnvelope,
        reason: str,
        status: int | None = None,
        body_excerpt: str = "",
    ) -> DeadLetter:
        entry = DeadLetter(
            delivery_id=envelope.delivery_id,
            destination=envelope.destination,
            reason=reason[:1000],
            status=status,
            body_excerpt=body_excerpt[:1024],
            dead_at=datetime.now(UTC),
            envelope=envelope,
        )
        self.add(entry)
        return entry

    def get(self, delivery_id: str) -> DeadLetter | None:
        raw = self.redis.hget(self.keys.dead_letters(), delivery_id)
        return DeadLetter.model_validate_json(raw) if raw else None

    def count(self) -> int:
        return int(self.redis.zcard(self.keys.dead_letter_index()))

    def counts_by_destination(self) -> dict[str, int]:
        raw: dict[bytes, bytes] = self.redis.hgetall(self.keys.dead_letter_counts())  # type: ignore[assignment]
        return {k.decode(): int(v) for k, v in raw.items() if int(v) > 0}

    def iter_entries(
        self,
        since: float = 0.0,
        destination: str | None = None,
        reason: str | None = None,
    ) -> Iterator[DeadLetter]:
        """Oldest first; ``reason`` matches a case-insensitive substring of the reason."""
        ids: list[bytes] = self.redis.zrangebyscore(  # type: ignore[assignment]
            self.keys.dead_letter_index(), since, "+inf"
        )
        for start in range(0, len(ids), 200):
            chunk = ids[start : start + 200]
            for raw in self.redis.hmget(self.keys.dead_letters(), chunk):
                if not raw:
                    continue
                entry = DeadLetter.model_validate_json(raw)
                if destination is not None and entry.destination != destination:
                    continue
                if reason is not None and reason.lower() not in entry.reason.lower():
                    continue
                yield entry

    def counts_by_reason(self, entries: Iterable[DeadLetter]) -> Counter[str]:
        return Counter(e.reason_category for e in entries)

    def remove(self, entry: DeadLetter) -> bool:
        return bool(self._remove(keys=self._keys(), args=[entry.delivery_id, entry.destination]))

    def replay_one(self, entry: DeadLetter, envelope: DeliveryEnvelope, wire: str) -> bool:
        """Enqueue ``wire`` and remove the entry, atomically; False if it was already gone."""
        queue = queue_for(envelope.kind)
        if self.broker is not self.redis:
            return self._replay_across(entry, queue, wire)
        return bool(
            self._replay(
                keys=[*self._keys(), queue_list(queue)],
                args=[entry.delivery_id, wire, entry.destination],
            )
        )

    def _replay_across(self, entry: DeadLetter, queue: str, wire: str) -> bool:
        """The entry becomes a ledger entry, then the message goes to the broker."""
        moved = self._to_ledger(
            keys=[*self._keys(), self.keys.ledger(), self.keys.ledger_messages()],
            args=[entry.delivery_id, f"{queue}\n{wire}", entry.destination,
                  time.time() + self.ledger_lease_seconds],
        )  # fmt: skip
        if not moved:
            return False
        try:
            publish(self.broker, queue, wire)
        except redis.RedisError as exc:
            # The delay mover publishes it once the broker answers (else the sweep, later).
            with contextlib.suppress(redis.RedisError):
                self.redis.sadd(self.keys.ledger_unpublished(), entry.delivery_id)
            log.warning("replay.broker_unavailable", delivery_id=entry.delivery_id,
                        error=str(exc), outcome="published when the broker is back")  # fmt: skip
        return True


class Replayer:
    """Puts dead letters back on their queues, paced by each destination's own rate limit."""

    def __init__(
        self,
        store: DeadLetterStore,
        destinations: Destinations,
        encoder: TaskMessageEncoder,
        limiter: GlobalRateLimiter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.destinations = destinations
        self.encoder = encoder
        self.limiter = limiter
        self.sleep = sleep

    def why_not(self, entry: DeadLetter) -> str | None:
        if entry.envelope is None:
            return "poison message: there is no delivery to replay (inspect it with dlq show)"
        if entry.destination not in self.destinations.by_name:
            return f"destination {entry.destination!r} is no longer in the destinations file"
        return None

    def fresh_envelope(self, entry: DeadLetter, now: datetime) -> DeliveryEnvelope:
        """Attempts start again and the age limit restarts; the history is kept."""
        assert entry.envelope is not None
        dest = self.destinations.get(entry.destination)
        return entry.envelope.model_copy(
            update={
                "attempt": 0,
                "created_at": now,
                "not_after": now + timedelta(seconds=dest.retry.max_age_seconds),
                "reserved_at": None,  # its send time was reserved before it died: long past
            }
        )

    def replay(
        self,
        entries: Iterable[DeadLetter],
        dry_run: bool = False,
        on_progress: Callable[[DeadLetter, str], None] | None = None,
    ) -> ReplayReport:
        report = ReplayReport()
        for entry in entries:
            why = self.why_not(entry)
            if why is not None:
                report.not_replayable[entry.delivery_id] = why
                outcome = "not replayable"
            elif dry_run:
                report.replayed.append(entry.delivery_id)
                outcome = "would replay"
            else:
                outcome = self._replay(entry, report)
            if on_progress is not None:
                on_progress(entry, outcome)
        return report

    def _replay(self, entry: DeadLetter, report: ReplayReport) -> str:
        dest = self.destinations.get(entry.destination)
        # A separate window with the destination's own limit: replay never sends faster than
        # the partner accepts, and leaves the live traffic's window alone.
        reservation = self.limiter.reserve(f"replay:{dest.name}", dest.rate_limit_item)
        if reservation is not None and reservation.wait > 0:
            self.sleep(reservation.wait)
        envelope = self.fresh_envelope(entry, datetime.now(UTC))
        wire = self.encoder.encode_envelope(
            envelope, task_id=f"{envelope.delivery_id}.replay.{int(time.time())}"
        )
        if self.store.replay_one(entry, envelope, wire):
            report.replayed.append(entry.delivery_id)
            return "replayed"
        report.already_gone.append(entry.delivery_id)
        return "already replayed or purged"
