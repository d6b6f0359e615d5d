"""Many deliveries at once against a slow partner: every ack goes through, so nothing is sent twice.

With the gevent pool every greenlet acks its own message through the worker's broker channel.
kombu's Redis channel allowed 10 connections, so a burst of finishing tasks (a slow partner
answers them together) failed acks with redis-py's MaxConnectionsError; each failed ack left the
message in kombu's unacked hash, to be delivered again one visibility timeout later.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producers.produce import Producer
from tests.conftest import WorkerProcess
from tests.helpers import wait_until
from workers.sandbox.receiver import Answer, PostbackReceiver

pytestmark = pytest.mark.integration

QUEUE = "postback.templated"
VISIBILITY = 10
PARTNER_DELAY = 2.0
# Small limits so that a failed ack would come back as a duplicate within the test:
# connect + read (5) < soft (6) < hard (8) < visibility (10).
ENV = {
    "POSTBACK_RELAY_VISIBILITY_TIMEOUT": str(VISIBILITY),
    "POSTBACK_RELAY_TASK_SOFT_TIME_LIMIT": "6",
    "POSTBACK_RELAY_TASK_TIME_LIMIT": "8",
    "POSTBACK_RELAY_HTTP_CONNECT_TIMEOUT": "1",
    "POSTBACK_RELAY_HTTP_READ_TIMEOUT": "4",
}
FAILED_ACK = re.compile(r"Couldn't ack|MaxConnectionsError|Too many connections")


def install(event_id: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "app_id": "123456789",
        "platform": "ios",
        "event_name": "install",
        "event_time": "2026-11-22T10:00:00Z",
        "idfa": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
    }


@pytest.mark.timeout(150)
@pytest.mark.parametrize("concurrency", [64, 256])
def test_a_slow_partner_at_full_concurrency_fails_no_ack_and_gets_no_duplicate(
    concurrency: int,
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: Callable[[Path, dict[str, str] | None], Producer],
    start_worker: Callable[..., WorkerProcess],
    redis_client: redis.Redis,
) -> None:
    # Every request is held, so the greenlets finish (and ack) in bursts of up to `concurrency`.
    receiver.responder = lambda req, seen: Answer(200, delay=PARTNER_DELAY)
    path = write_destinations(f"""
[[destination]]
name = "slow"
kind = "templated"
url = "{receiver.url}/pb/(event_id)"
timeout = {{ connect = 1, read = 4 }}
[[destination.routes]]
type = "install"
""")
    total = 4 * concurrency
    results = make_producer(path, None).produce_many(
        install(f"c{concurrency}-{i}") for i in range(total)
    )
    accepted = {d for r in results for d in r.accepted}
    assert len(accepted) == total
    worker = start_worker(
        path, "--queues", "templated", "--pool", "gevent", "--concurrency", str(concurrency),
        env=ENV,
    )  # fmt: skip

    def delivered() -> Counter[str]:
        return Counter(r.headers["X-Idempotency-Key"] for r in receiver.received(ok_only=True))

    assert wait_until(lambda: set(delivered()) >= accepted, 90), worker.log()[-3000:]
    # A failed ack leaves its message in kombu's unacked hash; it would be delivered again
    # once the visibility timeout passed (kombu restores every 10 s).
    settled = wait_until(lambda: redis_client.hlen("unacked") == 0, VISIBILITY + 20)
    got = delivered()
    duplicates = {key: n for key, n in got.items() if n > 1}
    failed_acks = [line for line in worker.log().splitlines() if FAILED_ACK.search(line)]
    print(
        f"\nconcurrency {concurrency}: {total} deliveries, {sum(got.values())} 2xx requests, "
        f"{len(duplicates)} duplicated ids, {len(failed_acks)} failed-ack log lines"
    )
    assert failed_acks == [], "\n".join(failed_acks[:5])
    assert settled, f"{redis_client.hlen('unacked')} messages left unacked"
    assert duplicates == {}
    assert set(got) == accepted
    assert worker.proc.poll() is None
