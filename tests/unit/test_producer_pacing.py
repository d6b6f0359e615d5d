"""produce() takes the first send time of each new delivery to a rate-limited destination
(producers/pacing.py): near ones go on their queue carrying it, far ones wait in the delay set
until shortly before it, so no worker runs a delivery once to park it and again to send it."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from config.keys import RedisKeys, queue_for
from producers.produce import Producer
from schemas.envelope import DeliveryEnvelope
from tests.helpers import install_event
from workers.broker.keys import queue_list
from workers.broker.wire import decode_task_args
from workers.delivery.ratelimit import GlobalRateLimiter, PauseRegistry

QUEUE = queue_for("templated")
KEYS = RedisKeys("pr")

DESTINATIONS = """
[[destination]]
name = "limited"
kind = "templated"
url = "https://a.example/i?idfa=(idfa)"
rate_limit = "2/second"
[[destination.routes]]
type = "install"

[[destination]]
name = "free"
kind = "templated"
url = "https://b.example/i?idfa=(idfa)"
[[destination.routes]]
type = "install"
"""


def event(event_id: str) -> dict[str, Any]:
    return dict(install_event(event_id))


@pytest.fixture
def producer(
    make_producer: Callable[[Path], Producer], write_destinations: Callable[[str], Path]
) -> Producer:
    return make_producer(write_destinations(DESTINATIONS))


def envelopes(raws: list[bytes]) -> list[DeliveryEnvelope]:
    return [DeliveryEnvelope.from_task_arg(decode_task_args(r.decode())[1][0]) for r in raws]


def queued(client: redis.Redis) -> list[DeliveryEnvelope]:
    return envelopes(client.lrange(queue_list(QUEUE), 0, -1))  # type: ignore[arg-type]


def delayed(client: redis.Redis) -> list[tuple[DeliveryEnvelope, float]]:
    members = client.zrange(KEYS.delayed(QUEUE), 0, -1, withscores=True)
    return list(zip(envelopes([m for m, _ in members]), [s for _, s in members], strict=True))


def test_near_turns_go_on_the_queue_and_far_ones_wait_in_the_delay_set_until_just_before(
    producer: Producer, redis_client: redis.Redis
) -> None:
    """Six installs at 2/s: turns 0.5 s apart. Those within the sleep bound (1 s) go on the
    queue with their time; the others wait in the delay set until park_lead (1 s) before it."""
    reserve_many = GlobalRateLimiter.reserve_many
    calls: list[int] = []

    def counted(self: GlobalRateLimiter, key: str, item: Any, count: int, *a: Any, **k: Any) -> Any:
        calls.append(count)
        return reserve_many(self, key, item, count, *a, **k)

    GlobalRateLimiter.reserve_many = counted  # type: ignore[method-assign]
    try:
        results = producer.produce_many([event(f"e{i}") for i in range(6)])
    finally:
        GlobalRateLimiter.reserve_many = reserve_many  # type: ignore[method-assign]
    assert all(len(r.accepted) == 2 for r in results)
    assert calls == [6]  # one reservation call for the six, none for "free"

    now_queue = [e for e in queued(redis_client) if e.destination == "limited"]
    later = [(e, due) for e, due in delayed(redis_client) if e.destination == "limited"]
    assert len(now_queue) + len(later) == 6
    assert 2 <= len(now_queue) <= 3
    assert len(later) >= 3
    times = sorted(e.reserved_at for e in now_queue + [e for e, _ in later])  # type: ignore[type-var]
    assert [round(b - a, 3) for a, b in itertools.pairwise(times)] == [0.5] * 5  # type: ignore[operator]
    for envelope, due in later:
        assert envelope.attempt == 0
        assert envelope.reserved_at is not None
        assert due == pytest.approx(envelope.reserved_at - 1.0, abs=0.05)
        assert redis_client.zscore(KEYS.ledger(), envelope.delivery_id) is not None
    # An unlimited destination's deliveries are as before: on the queue, no time of their own.
    free = [e for e in queued(redis_client) if e.destination == "free"]
    assert len(free) == 6
    assert all(e.reserved_at is None for e in free)


def test_duplicates_and_paused_destinations_take_no_turn(
    producer: Producer, redis_client: redis.Redis
) -> None:
    first = [event(f"d{i}") for i in range(4)]  # 4 at 2/s: the last 1.5 s off, so taken here
    producer.produce_many(first)
    turn = redis_client.get(KEYS.rate_limit("limited"))
    assert turn is not None
    again = producer.produce_many(first)
    assert all(r.accepted == [] for r in again)
    assert redis_client.get(KEYS.rate_limit("limited")) == turn  # no slot spent on them

    PauseRegistry(redis_client, KEYS).pause("limited", 60, "429 Retry-After: 60")
    paused = producer.produce_many([event(f"p{i}") for i in range(4)])
    assert all(len(r.accepted) == 2 for r in paused)
    assert redis_client.get(KEYS.rate_limit("limited")) == turn
    # They go on their queue without a time: a worker defers them until the pause ends.
    ids = {d for r in paused for d in r.accepted}
    mine = [e for e in queued(redis_client) if e.delivery_id in ids and e.destination == "limited"]
    assert len(mine) == 4
    assert all(e.reserved_at is None for e in mine)


def test_a_destination_that_keeps_up_is_left_to_the_workers(
    producer: Producer, redis_client: redis.Redis
) -> None:
    """One event, then another, each due at once: nothing would be parked, so produce() takes
    no turn (a turn due now would go by before a worker picked the delivery up, and it would
    take a second one)."""
    for name in ("k1", "k2"):
        producer.produce(event(name))
    assert redis_client.get(KEYS.rate_limit("limited")) is None
    limited = [e for e in queued(redis_client) if e.destination == "limited"]
    assert len(limited) == 2
    assert all(e.reserved_at is None for e in limited)
    assert delayed(redis_client) == []
