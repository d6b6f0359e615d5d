"""SIGTERM is a warm shutdown: in-flight deliveries finish, the rest go back to the queue."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from config.keys import RedisKeys
from producers.produce import Producer
from tests.conftest import WorkerProcess
from workers.dev.receiver import Answer, PostbackReceiver, ReceivedRequest
from workers.stores.deadletter import DeadLetterStore

pytestmark = pytest.mark.integration

QUEUE = "postback.templated"


def test_sigterm_finishes_in_flight_deliveries_and_returns_the_rest(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: Callable[[Path], Producer],
    start_worker: Callable[..., WorkerProcess],
    redis_client: redis.Redis,
) -> None:
    arrived: list[str] = []

    def slow(req: ReceivedRequest, seen: int) -> Answer:
        arrived.append(req.headers["X-Idempotency-Key"])
        return Answer(200, delay=2.0)

    receiver.responder = slow
    path = write_destinations(f"""
[[destination]]
name = "slow"
kind = "templated"
url = "{receiver.url}/pb?e=(event-name)"
[[destination.routes]]
type = "install"
""")
    producer = make_producer(path)
    accepted = []
    for i in range(20):
        accepted += producer.produce({
            "event_id": f"s{i}", "app_id": "id1", "platform": "ios", "event_name": "install",
            "event_time": "2026-11-22T10:00:00Z",
        }).accepted  # fmt: skip
    worker = start_worker(path, "--queues", "templated", "--concurrency", "4")
    deadline = time.monotonic() + 20
    while len(arrived) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(arrived) == 4, worker.log()[-2000:]
    in_flight = set(arrived)

    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 0, worker.log()[-2000:]

    finished = {r.headers["X-Idempotency-Key"] for r in receiver.received(ok_only=True)}
    assert in_flight <= finished, "an in-flight delivery was cut off by SIGTERM"
    assert len(receiver.received()) == len(finished), "no request may be left unanswered"
    # Everything not delivered is back on the queue (prefetched messages are restored).
    assert redis_client.hlen("unacked") == 0
    assert redis_client.llen(QUEUE) == len(accepted) - len(finished)
    assert DeadLetterStore(redis_client, RedisKeys("pr")).count() == 0

    # A new worker delivers the rest: nothing was lost, nothing sent twice.
    second = start_worker(path, "--queues", "templated", "--concurrency", "8")
    deadline = time.monotonic() + 40
    while len(receiver.received(ok_only=True)) < len(accepted) and time.monotonic() < deadline:
        time.sleep(0.1)
    keys = [r.headers["X-Idempotency-Key"] for r in receiver.received(ok_only=True)]
    assert sorted(keys) == sorted(accepted), second.log()[-2000:]
