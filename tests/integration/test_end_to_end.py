"""produce() -> Redis -> a real worker process -> a real local HTTP server, asserted exactly."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from config.keys import RedisKeys
from producers.produce import Producer
from schemas.envelope import delivery_id_for
from tests.conftest import WorkerProcess
from workers.dev.receiver import Answer, PostbackReceiver, ReceivedRequest
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore

pytestmark = pytest.mark.integration

SECRET = "tok-3f9a1c77e2"

IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
GAID = "38400000-8cf0-11bd-b23e-10b96e40000d"


def destinations(base: str, retry: str = "", delay: float = 0) -> str:
    return f"""
[[destination]]
name = "net-get"
kind = "templated"
url = "{base}/pb/(app-id)?idfa=(idfa)&gaid=(advertiserId)&e=(event-name)&json=(encode)&rev=(monetary)&cur=(currency)&ts=(install-unix-ts)&c=(campaign)"
{retry}
[[destination.routes]]
type = "install"
delay_seconds = {delay}
[[destination.routes]]
type = "event"
events = ["af_purchase"]

[[destination]]
name = "analytics-post"
kind = "templated"
url = "{base}/post?key={{credential:token}}"
method = "POST"
headers = {{ Authorization = "Bearer {{credential:token}}" }}
body = {{ event = "(event-name)", device = "(device-id)", id = "(delivery_id)" }}
credentials = {{ token = {{ env = "TEST_PARTNER_TOKEN" }} }}
[[destination.routes]]
type = "event"
events = ["af_purchase"]
"""


def install(**extra: Any) -> dict[str, Any]:
    return {
        "event_id": "install-1",
        "app_id": "123456789",
        "platform": "ios",
        "event_name": "install",
        "event_time": "2026-11-22T10:00:00+01:00",
        "install_time": "2026-11-22T09:59:00Z",
        "idfa": IDFA,
        "campaign": "winter sale/&=?",
        **extra,
    }


def purchase(**extra: Any) -> dict[str, Any]:
    return {
        "event_id": "purchase-1",
        "app_id": "com.example.game",
        "platform": "android",
        "event_name": "af_purchase",
        "event_time": "2026-11-22T10:05:00Z",
        "install_time": "2026-11-22T09:59:00Z",
        "gaid": GAID,
        "revenue": "4.990000",
        "currency": "EUR",
        "event_values": {"sku": "gems 500", "qty": 1},
        **extra,
    }


@pytest.fixture
def setup(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: Callable[[Path], Producer],
    start_worker: Callable[..., WorkerProcess],
) -> Callable[..., tuple[Producer, WorkerProcess]]:
    def make(**kwargs: Any) -> tuple[Producer, WorkerProcess]:
        path = write_destinations(destinations(receiver.url, **kwargs))
        producer = make_producer(path)
        worker = start_worker(path, env={"TEST_PARTNER_TOKEN": SECRET})
        return producer, worker

    return make


def test_install_and_purchase_arrive_as_exact_requests(
    setup: Callable[..., tuple[Producer, WorkerProcess]],
    receiver: PostbackReceiver,
    redis_client: redis.Redis,
) -> None:
    producer, worker = setup()
    # The worker said on the broker where its state lives: producers check they agree.
    assert redis_client.get(RedisKeys("pr").state_instance()) == b"the broker's instance"
    install_result = producer.produce(install())
    purchase_result = producer.produce(purchase())
    assert len(install_result.accepted) == 1
    assert len(purchase_result.accepted) == 2

    got = receiver.wait_for(3, timeout=20)
    assert len(got) == 3, worker.log()[-3000:]
    by_path = {r.path: r for r in got}

    ios = by_path["/pb/id123456789"]
    assert ios.method == "GET"
    assert ios.query == [
        ("idfa", IDFA),
        ("gaid", ""),
        ("e", "install"),
        ("json", ""),
        ("rev", ""),
        ("cur", ""),
        ("ts", str(int(datetime(2026, 11, 22, 9, 59, tzinfo=UTC).timestamp()))),
        ("c", "winter sale/&=?"),
    ]
    assert ios.headers["X-Idempotency-Key"] == delivery_id_for("install-1", "net-get")
    assert ios.headers["User-Agent"].startswith("postback-relay/")

    android = by_path["/pb/com.example.game"]
    params = dict(android.query)
    assert params["gaid"] == GAID
    assert params["idfa"] == ""
    assert params["e"] == "af_purchase"
    assert json.loads(params["json"]) == {"sku": "gems 500", "qty": 1}
    assert (params["rev"], params["cur"]) == ("4.990000", "EUR")

    post = by_path["/post"]
    assert post.method == "POST"
    assert post.query == [("key", SECRET)]
    assert post.headers["Authorization"] == f"Bearer {SECRET}"
    assert post.headers["Content-Type"] == "application/json"
    assert json.loads(post.body) == {
        "event": "af_purchase",
        "device": GAID,
        "id": delivery_id_for("purchase-1", "analytics-post"),
    }

    records = _wait_records(AttemptLog(redis_client, RedisKeys("pr"), 1000), 3)
    assert {r["notifying_status"] for r in records} == {"sent"}
    post_record = next(r for r in records if r["destination"] == "analytics-post")
    assert post_record["postback_url"].endswith("/post?key=***")
    assert post_record["response_code"] == "200"
    assert SECRET not in worker.log()
    assert SECRET not in json.dumps(records)


def _wait_records(log: AttemptLog, count: int, timeout: float = 10) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    records: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        records = list(log.iter_records())
        if len(records) >= count:
            break
        time.sleep(0.05)
    return records


def test_5xx_is_retried_with_the_same_idempotency_key_until_delivered(
    setup: Callable[..., tuple[Producer, WorkerProcess]],
    receiver: PostbackReceiver,
) -> None:
    def two_failures(req: ReceivedRequest, seen: int) -> Answer:
        return Answer(503, "busy") if seen < 2 else Answer(200)

    receiver.responder = two_failures
    producer, worker = setup(retry="retry = { schedule = [0.5, 0.5], jitter = 0 }")
    producer.produce(install())

    got = receiver.wait_for(3, timeout=20)
    time.sleep(1.5)  # nothing more may arrive after the success
    got = receiver.received()
    assert [r.status for r in got] == [503, 503, 200], worker.log()[-3000:]
    assert len({r.headers["X-Idempotency-Key"] for r in got}) == 1
    assert got[1].at - got[0].at >= 0.45
    assert got[2].at - got[1].at >= 0.45


def test_permanent_4xx_is_dead_lettered_after_one_attempt(
    setup: Callable[..., tuple[Producer, WorkerProcess]],
    receiver: PostbackReceiver,
    redis_client: redis.Redis,
) -> None:
    receiver.responder = lambda req, seen: Answer(400, '{"error":"bad app id"}')
    producer, worker = setup(retry="retry = { schedule = [0.2], jitter = 0 }")
    (delivery_id,) = producer.produce(install()).accepted

    store = DeadLetterStore(redis_client, RedisKeys("pr"))
    deadline = time.monotonic() + 20
    while store.get(delivery_id) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    entry = store.get(delivery_id)
    assert entry is not None, worker.log()[-3000:]
    assert entry.status == 400
    assert entry.reason == "HTTP 400"
    assert "bad app id" in entry.body_excerpt
    assert entry.envelope is not None
    assert len(entry.envelope.history) == 1
    time.sleep(0.5)
    assert len(receiver.received()) == 1


def test_route_delivery_delay_waits_in_the_delay_set(
    setup: Callable[..., tuple[Producer, WorkerProcess]],
    receiver: PostbackReceiver,
    redis_client: redis.Redis,
) -> None:
    producer, worker = setup(delay=2)
    produced_at = time.time()
    producer.produce(install())
    time.sleep(1.0)
    assert receiver.received() == []
    assert redis_client.zcard(RedisKeys("pr").delayed("postback.templated")) == 1
    (got,) = receiver.wait_for(1, timeout=15)
    assert got.at - produced_at >= 2.0, worker.log()[-2000:]
