"""The one raw publish: a message from each of the six writers is read back by kombu itself.

kombu's own Redis channel takes each message off the queue and decodes it into the task
Celery would run: the publish helper writes exactly what kombu's transport would have. Real
workers consuming these writers' messages end to end: tests/integration/test_end_to_end.py
(produce, requeue after a 5xx, the delay mover for a route's delay),
tests/failure/test_rate_limit_and_replay.py (replay), tests/failure/test_crashes.py (the
ledger sweep after a lost message), tests/integration/test_reconciler_e2e.py (the reconciler).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu import Connection

from config.keys import RedisKeys, queue_for, task_name_for
from producers.produce import Producer
from schemas.envelope import DeliveryEnvelope
from tests.helpers import NOW_AND_LATER
from workers.broker import unacked_queues
from workers.broker.keys import UNACKED, queue_list
from workers.broker.publish import Enqueue, EnqueueOnce
from workers.broker.wire import TaskMessageEncoder
from workers.stores.deadletter import DeadLetterStore
from workers.stores.delay import DelaySet
from workers.stores.ledger import DeliveryLedger
from workers.stores.requeue import Requeuer

KEYS = RedisKeys("pr")
QUEUE = queue_for("templated")
TASK = task_name_for("templated")


@pytest.fixture
def kombu_queue(redis_url: str) -> Iterator[Callable[[], tuple[str, DeliveryEnvelope]]]:
    """Takes the next message off the queue with kombu's Redis channel, as a worker does."""
    with Connection(redis_url) as conn:
        queue = conn.SimpleQueue(QUEUE, no_ack=True)

        def take() -> tuple[str, DeliveryEnvelope]:
            message = queue.get(timeout=2)
            args, kwargs, _embed = message.decode()
            assert message.headers["task"] == TASK
            assert message.properties["delivery_info"]["routing_key"] == QUEUE
            assert kwargs == {}
            return message.headers["id"], DeliveryEnvelope.from_task_arg(args[0])

        yield take
        queue.close()


@pytest.fixture
def producer(
    make_producer: Callable[[Path], Producer], write_destinations: Callable[[str], Path]
) -> Producer:
    return make_producer(write_destinations(NOW_AND_LATER))


def install(event_id: str) -> dict[str, str]:
    return {"event_id": event_id, "app_id": "id1", "platform": "ios", "event_name": "install",
            "event_time": "2026-11-22T10:00:00Z"}  # fmt: skip


def test_a_message_from_each_writer_is_read_by_kombu_as_the_task_it_carries(
    producer: Producer,
    redis_client: redis.Redis,
    kombu_queue: Callable[[], tuple[str, DeliveryEnvelope]],
) -> None:
    encoder = TaskMessageEncoder(Celery("postback_relay", set_as_current=False))
    delays = DelaySet(redis_client, KEYS)
    ledger = DeliveryLedger(redis_client, KEYS, lease_seconds=1)

    # 1. produce(): the route without a delay is published now, the other waits.
    result = producer.produce(install("e1"))
    task_id, envelope = kombu_queue()
    assert envelope.destination == "now"
    assert task_id == envelope.delivery_id
    # 2. the delay mover publishes the delayed one once it is due.
    assert delays.move_due([QUEUE], now=time.time() + 120) == 1
    _, later = kombu_queue()
    assert later.destination == "later"
    assert set(result.accepted) == {envelope.delivery_id, later.delivery_id}

    # 3. the requeue after a retry, for now.
    Requeuer(redis_client, delays, encoder, ledger).later(
        envelope.model_copy(update={"attempt": 1}), 0
    )
    task_id, again = kombu_queue()
    assert (task_id, again.attempt) == (f"{envelope.delivery_id}.1", 1)

    # 4. the ledger sweep, for the delivery the requeue parked (its queue is empty now).
    assert ledger.sweep(now=time.time() + 60, queues=[QUEUE]) == 1
    _, swept = kombu_queue()
    assert swept == again

    # 5. dead-letter replay.
    store = DeadLetterStore(redis_client, KEYS)
    entry = store.add_envelope(envelope, "HTTP 500")
    wire = encoder.encode_envelope(envelope, task_id=f"{envelope.delivery_id}.replay")
    assert store.replay_one(entry, envelope, wire)
    task_id, replayed = kombu_queue()
    assert (task_id, replayed) == (f"{envelope.delivery_id}.replay", envelope)

    # 6. the reconciler's claim-once enqueue.
    enqueue = EnqueueOnce(redis_client, KEYS, 60)
    claim = KEYS.reconciled("main", "identity")
    item = Enqueue(claim, QUEUE, False, time.time(), wire, "d-rec", QUEUE)
    assert enqueue([item, item], 60) == [True, False]
    _, reconciled = kombu_queue()
    assert reconciled == envelope
    assert redis_client.llen(QUEUE) == 0


def test_unacked_queues_reads_the_queue_of_each_message_kombu_holds_unacked(
    redis_client: redis.Redis, redis_url: str
) -> None:
    with Connection(redis_url) as conn:
        producer = conn.SimpleQueue(QUEUE)
        producer.put({"x": 1})
        channel = conn.default_channel
        message = channel.basic_get(QUEUE, no_ack=False)
        assert message is not None
        assert unacked_queues(redis_client) == [QUEUE]
        redis_client.hset(UNACKED, "garbage", b"not json")
        assert unacked_queues(redis_client) == [QUEUE]
        message.ack()
        producer.close()


def test_queue_list_is_the_list_kombu_puts_a_priority_0_message_on(redis_url: str) -> None:
    with Connection(redis_url) as conn:
        assert conn.default_channel._q_for_pri(QUEUE, 0) == queue_list(QUEUE)
