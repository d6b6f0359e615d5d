"""The delivery ledger: produce() records, progress pushes the deadline, finishing removes,
the sweep publishes again only what stalled (real Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from config.keys import RedisKeys
from producers.produce import Producer
from workers.broker.wire import decode_task_args
from workers.stores.ledger import DeliveryLedger

QUEUE = "postback.templated"
KEYS = RedisKeys("pr")
DESTINATIONS = """
[[destination]]
name = "a"
kind = "templated"
url = "http://127.0.0.1:9/x"
[[destination.routes]]
type = "install"
"""


def install(event_id: str) -> dict[str, str]:
    return {"event_id": event_id, "app_id": "id1", "platform": "ios", "event_name": "install",
            "event_time": "2026-11-22T10:00:00Z"}  # fmt: skip


def test_produce_records_each_delivery_with_its_message(
    make_producer: Callable[[Path], Producer],
    write_destinations: Callable[[str], Path],
    redis_client: redis.Redis,
) -> None:
    producer = make_producer(write_destinations(DESTINATIONS))
    before = time.time()
    (delivery_id,) = producer.produce(install("e1")).accepted
    deadline = redis_client.zscore(KEYS.ledger(), delivery_id)
    lease = producer.settings.ledger_lease_seconds
    assert deadline is not None
    assert before + lease <= deadline <= time.time() + lease
    queue, wire = redis_client.hget(KEYS.ledger_messages(), delivery_id).decode().split("\n", 1)  # type: ignore[union-attr]
    assert queue == QUEUE
    assert wire == redis_client.lindex(QUEUE, 0).decode()  # type: ignore[union-attr]
    # A duplicate produce() records nothing new.
    producer.produce(install("e1"))
    assert redis_client.zcard(KEYS.ledger()) == 1


def test_sweep_publishes_again_only_what_passed_its_deadline(
    make_producer: Callable[[Path], Producer],
    write_destinations: Callable[[str], Path],
    redis_client: redis.Redis,
) -> None:
    producer = make_producer(write_destinations(DESTINATIONS))
    stalled, fresh = (producer.produce(install(e)).accepted[0] for e in ("s", "f"))
    redis_client.delete(QUEUE)  # both messages "lost" (e.g. popped just before a crash)
    ledger = DeliveryLedger(redis_client, KEYS, lease_seconds=30)
    now = time.time()
    redis_client.zadd(KEYS.ledger(), {stalled: now - 1})

    assert ledger.sweep(now) == 1
    (republished,) = redis_client.lrange(QUEUE, 0, -1)
    assert decode_task_args(republished.decode())[1][0]["delivery_id"] == stalled
    assert redis_client.zscore(KEYS.ledger(), stalled) == now + 30  # not again until then
    assert ledger.sweep(now) == 0
    assert redis_client.zscore(KEYS.ledger(), fresh) is not None


def test_progress_moves_the_deadline_and_finishing_removes_the_entry(
    redis_client: redis.Redis,
) -> None:
    ledger = DeliveryLedger(redis_client, KEYS, lease_seconds=30)
    with redis_client.pipeline() as pipe:
        ledger.touch(pipe, "untracked", 100.0)  # touch never creates an entry
        ledger.park(pipe, "d1", QUEUE, "wire-v2", due=500.0)
        pipe.execute()
    assert redis_client.zscore(KEYS.ledger(), "untracked") is None
    assert redis_client.zscore(KEYS.ledger(), "d1") == 530.0
    assert redis_client.hget(KEYS.ledger_messages(), "d1") == f"{QUEUE}\nwire-v2".encode()
    with redis_client.pipeline() as pipe:
        ledger.touch(pipe, "d1", 1000.0)
        pipe.execute()
    assert redis_client.zscore(KEYS.ledger(), "d1") == 1030.0
    with redis_client.pipeline() as pipe:
        ledger.settle(pipe, "d1")
        pipe.execute()
    assert ledger.size() == 0
    assert not redis_client.hexists(KEYS.ledger_messages(), "d1")


def test_concurrent_sweeps_publish_each_stalled_delivery_once(
    redis_client: redis.Redis, redis_url: str
) -> None:
    with redis_client.pipeline() as pipe:
        for i in range(2000):
            pipe.zadd(KEYS.ledger(), {f"d{i}": 1.0})
            pipe.hset(KEYS.ledger_messages(), f"d{i}", f"{QUEUE}\nmsg-{i}")
        pipe.execute()
    totals: list[int] = []
    consumed: list[bytes] = []
    done = threading.Event()

    def sweeper() -> None:
        client = redis.Redis.from_url(redis_url)
        ledger = DeliveryLedger(client, KEYS, lease_seconds=600)
        published, deadline = 0, time.monotonic() + 20
        while client.zcount(KEYS.ledger(), "-inf", 10.0) and time.monotonic() < deadline:
            published += ledger.sweep(now=10.0, limit=50)
        totals.append(published)

    def consumer() -> None:  # a worker draining the queue, so sweeps find it empty again
        client = redis.Redis.from_url(redis_url)
        while not done.is_set() or client.llen(QUEUE):
            item = client.rpop(QUEUE)
            if item is not None:
                consumed.append(item)  # type: ignore[arg-type]

    drain = threading.Thread(target=consumer)
    drain.start()
    threads = [threading.Thread(target=sweeper) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    drain.join()
    published = [m.decode() for m in consumed]
    assert sum(totals) == 2000
    assert sorted(published) == sorted(f"msg-{i}" for i in range(2000))


def test_a_delivery_waiting_behind_a_backlog_is_not_published_twice(
    redis_client: redis.Redis,
) -> None:
    ledger = DeliveryLedger(redis_client, KEYS, lease_seconds=30)
    redis_client.lpush(QUEUE, "still-queued-message")
    redis_client.zadd(KEYS.ledger(), {"waiting": 1.0})
    redis_client.hset(KEYS.ledger_messages(), "waiting", f"{QUEUE}\nstill-queued-message")
    assert ledger.sweep(now=100.0) == 0  # its queue has not drained: waiting, not lost
    redis_client.delete(QUEUE)
    assert ledger.sweep(now=100.0) == 1


def test_a_drained_queue_must_stay_empty_for_the_hold_before_anything_is_published_again(
    redis_client: redis.Redis,
) -> None:
    """The last messages of a backlog may wait in a worker's prefetch buffer after their queue
    has emptied; until the hold passes they are not lost, only not started yet."""
    ledger = DeliveryLedger(redis_client, KEYS, lease_seconds=30, drained_hold_seconds=60)
    redis_client.zadd(KEYS.ledger(), {"late": 1.0})
    redis_client.hset(KEYS.ledger_messages(), "late", f"{QUEUE}\nlate-message")
    redis_client.lpush(QUEUE, "backlog")
    assert ledger.sweep(now=100.0, queues=[QUEUE]) == 0  # a backlog: waiting
    redis_client.delete(QUEUE)  # the backlog drained; "late" may sit in a prefetch buffer
    assert ledger.sweep(now=101.0, queues=[QUEUE]) == 0
    assert ledger.sweep(now=160.0, queues=[QUEUE]) == 0
    redis_client.lpush(QUEUE, "more")  # new work arrives and drains: the hold starts again
    assert ledger.sweep(now=161.0, queues=[QUEUE]) == 0
    redis_client.delete(QUEUE)
    assert ledger.sweep(now=162.0, queues=[QUEUE]) == 0
    assert ledger.sweep(now=221.0, queues=[QUEUE]) == 0
    assert ledger.sweep(now=222.0, queues=[QUEUE]) == 1  # empty for 60 s: really lost
    assert redis_client.lrange(QUEUE, 0, -1) == [b"late-message"]
    # Publishing refilled the queue: the next one waits for a new hold.
    redis_client.zadd(KEYS.ledger(), {"later": 1.0})
    redis_client.hset(KEYS.ledger_messages(), "later", f"{QUEUE}\nlater-message")
    redis_client.delete(QUEUE)
    assert ledger.sweep(now=223.0, queues=[QUEUE]) == 0
