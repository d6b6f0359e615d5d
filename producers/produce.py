"""produce(): validate an event, route it, and enqueue one delivery per destination, atomically."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import Celery

from config.destination_base import DestinationBase, Route
from config.destinations import Destinations, load_destinations
from config.keys import RedisKeys, queue_for
from config.settings import Settings
from producers.pacing import FirstTurns
from schemas.envelope import DeliveryEnvelope, delivery_id_for
from schemas.errors import InvalidEvent
from schemas.event import ConversionEvent
from workers import redis_clients, state_instance
from workers.broker.publish import Batch, Enqueue, EnqueueOnce
from workers.broker.replication import ReplicaWait
from workers.broker.wire import TaskMessageEncoder

MAX_BATCH = 500


@dataclass(frozen=True)
class ProduceResult:
    """What happened to one event: delivery ids enqueued now, ids already enqueued, or an error."""

    event_id: str | None
    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    error: str | None = None
    destinations: dict[str, str] = field(default_factory=dict)  # delivery id -> destination

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class _Planned(Enqueue):
    delivery_id: str = ""
    destination: str = ""
    kind: str = ""
    envelope_json: str = ""  # serialised once, for its own message and for its batch's


class Producer:
    """Holds what producing needs: settings, destinations, a Redis client, a message encoder.

    ``client`` holds the claims and the ledger (the state instance); ``broker``, the queues,
    when they are on an instance of their own. Then the state is written first: produce()
    raises only when that failed (nothing was accepted); deliveries accepted while the broker
    is down reach it through the ledger's sweep (workers/broker/publish.py)."""

    def __init__(
        self,
        settings: Settings,
        destinations: Destinations,
        client: redis.Redis,
        broker: redis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.destinations = destinations
        self.redis = client
        self.keys = RedisKeys(settings.key_prefix)
        # However it is built (from settings, by the API, by the CLI): the workers' state first.
        state_instance.check(client if broker is None else broker, self.keys, settings)
        self._encoder = TaskMessageEncoder(Celery("postback_relay", set_as_current=False))
        self._turns = FirstTurns(client, self.keys, destinations, settings)
        wait = (
            ReplicaWait(settings.produce_wait_replicas, settings.produce_wait_timeout_ms)
            if settings.produce_wait_replicas
            else None
        )
        self._enqueue = EnqueueOnce(
            client, self.keys, settings.ledger_lease_seconds, wait, broker=broker
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Producer:
        settings = settings or Settings()
        destinations = load_destinations(settings.destinations_file)
        broker, state = redis_clients.broker_and_state(settings)
        return cls(settings, destinations, state, broker)

    def envelope_for(
        self, event: ConversionEvent, dest: DestinationBase, route: Route, now: datetime
    ) -> DeliveryEnvelope:
        assert event.event_id is not None
        retries = (
            route.max_delivery_attempts
            if route.max_delivery_attempts is not None
            else dest.retry.max_attempts
        )
        return DeliveryEnvelope(
            delivery_id=delivery_id_for(event.event_id, dest.name),
            destination=dest.name,
            kind=dest.kind,
            event=event,
            attempt=0,
            max_attempts=1 + retries,
            created_at=now,
            not_after=now + timedelta(seconds=dest.retry.max_age_seconds),
        )

    def _route(self, event: ConversionEvent, now: datetime) -> list[tuple[DeliveryEnvelope, float]]:
        """The event's deliveries, each with its delivery delay (seconds, 0: none)."""
        return [
            (self.envelope_for(event, dest, route, now), route.delay_seconds)
            for dest, route in self.destinations.routes_for(event)
        ]

    def _plan(self, routed: Sequence[tuple[DeliveryEnvelope, float]], now: float) -> list[_Planned]:
        """Each delivery's message and where it goes: a new one to a rate-limited destination
        carries its first send time, and waits in the delay set when that is far off
        (producers/pacing.py)."""
        turn = iter(self._turns.take([e for e, delay in routed if delay <= 0]))
        planned = []
        for routed_envelope, delay in routed:
            envelope, due, delayed = routed_envelope, now + delay, delay > 0
            if not delayed:
                first = next(turn)
                if first is not None:
                    envelope = envelope.model_copy(update={"reserved_at": first.send_at})
                    if first.park_until is not None:
                        due, delayed = first.park_until, True
            queue = queue_for(envelope.kind)
            envelope_json = envelope.model_dump_json()
            wire = self._encoder.encode_envelope(envelope, envelope.delivery_id, envelope_json)
            planned.append(
                _Planned(
                    delivery_id=envelope.delivery_id,
                    destination=envelope.destination,
                    claim_key=self.keys.dedupe(envelope.delivery_id),
                    ledger_id=envelope.delivery_id,
                    queue=queue,
                    target_key=self.keys.delayed(queue) if delayed else queue,
                    delayed=delayed,
                    due=due,
                    wire=wire,
                    kind=envelope.kind,
                    envelope_json=envelope_json,
                )
            )
        return planned

    def _run(self, planned: Sequence[_Planned]) -> list[bool]:
        return self._enqueue(planned, self.settings.dedupe_ttl_seconds, self._batches(planned))

    def _batches(self, planned: Sequence[_Planned]) -> list[Batch]:
        """What goes out now, grouped per queue into task messages of up to ``batch_size``
        deliveries; each delivery keeps its own message for the ledger (and for when its batch
        cannot go out whole). A delayed delivery waits alone in the delay set; the mover
        groups it when it is due."""
        size = self.settings.batch_size
        if size <= 1:
            return []
        per_queue: dict[str, list[int]] = {}
        for index, plan in enumerate(planned):
            if not plan.delayed:
                per_queue.setdefault(plan.queue, []).append(index)
        batches = []
        for members in per_queue.values():
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                if len(chunk) > 1:
                    wire = self._encoder.encode_batch(
                        planned[chunk[0]].kind,
                        [planned[i].envelope_json for i in chunk],
                        [planned[i].destination for i in chunk],
                    )
                    batches.append(Batch(tuple(chunk), wire))
        return batches

    def produce(self, event: ConversionEvent | dict[str, Any]) -> ProduceResult:
        """Validate, route and enqueue one event; raise InvalidEvent and enqueue nothing if bad.
        With POSTBACK_RELAY_PRODUCE_WAIT_REPLICAS, raise NotReplicated when too few replicas
        acknowledged the write in time (produce the event again: see NotReplicated)."""
        parsed = ConversionEvent.parse(event)
        now = datetime.now(UTC)
        planned = self._plan(self._route(parsed, now), now.timestamp())
        return _result(parsed.event_id, planned, self._run(planned))

    def produce_many(
        self, events: Iterable[ConversionEvent | dict[str, Any]]
    ) -> list[ProduceResult]:
        """One result per input, in order; the valid events are enqueued, one round trip a batch.
        NotReplicated (with the replica wait) fails the whole call: produce every event again
        (those already enqueued come back as duplicates)."""
        results: list[ProduceResult] = []
        batch: list[tuple[int, str | None, int]] = []  # result index, event id, deliveries
        routed: list[tuple[DeliveryEnvelope, float]] = []
        now = datetime.now(UTC)

        def flush() -> None:
            # One Lua call carries at most MAX_BATCH deliveries, and one round trip takes the
            # first send times of those among them that need one.
            flat = self._plan(routed, now.timestamp())
            flags = iter(self._run(flat))
            plans = iter(flat)
            for index, event_id, count in batch:
                own = [next(plans) for _ in range(count)]
                results[index] = _result(event_id, own, [next(flags) for _ in own])
            batch.clear()
            routed.clear()

        for raw in events:
            try:
                parsed = ConversionEvent.parse(raw)
            except InvalidEvent as exc:
                results.append(ProduceResult(_raw_event_id(raw), error=str(exc)))
                continue
            results.append(ProduceResult(parsed.event_id))
            deliveries = self._route(parsed, now)
            batch.append((len(results) - 1, parsed.event_id, len(deliveries)))
            routed.extend(deliveries)
            if len(routed) >= MAX_BATCH:
                flush()
        flush()
        return results


def _result(
    event_id: str | None, planned: Sequence[_Planned], flags: Sequence[bool]
) -> ProduceResult:
    accepted = [p.delivery_id for p, new in zip(planned, flags, strict=True) if new]
    duplicates = [p.delivery_id for p, new in zip(planned, flags, strict=True) if not new]
    return ProduceResult(
        event_id, accepted, duplicates, destinations={p.delivery_id: p.destination for p in planned}
    )


def _raw_event_id(raw: Any) -> str | None:
    value = raw.get("event_id") if isinstance(raw, dict) else getattr(raw, "event_id", None)
    return value if isinstance(value, str) else None


_default: Producer | None = None
_default_lock = threading.Lock()


def default_producer() -> Producer:
    """The process-wide producer, built from the environment on first use (not at import)."""
    global _default  # noqa: PLW0603 - one lazily built client per process, like a connection pool
    with _default_lock:
        if _default is None:
            _default = Producer.from_settings()
        return _default


def set_default_producer(producer: Producer | None) -> None:
    global _default  # noqa: PLW0603
    with _default_lock:
        _default = producer


def produce(event: ConversionEvent | dict[str, Any]) -> ProduceResult:
    """Validate, route and enqueue ``event``; returns the accepted delivery ids."""
    return default_producer().produce(event)


def produce_many(events: Iterable[ConversionEvent | dict[str, Any]]) -> list[ProduceResult]:
    return default_producer().produce_many(events)
