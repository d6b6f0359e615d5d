"""produce()/produce_many() against a real Redis: routing, atomic dedupe, one round trip a batch."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

import producers
from config.keys import RedisKeys, queue_for, task_name_for
from producers.produce import Producer, set_default_producer
from schemas.envelope import DeliveryEnvelope, delivery_id_for
from schemas.errors import InvalidEvent
from workers.broker.wire import TaskMessageEncoder, decode_task_args

QUEUE = queue_for("templated")
KEYS = RedisKeys("pr")

DESTINATIONS = """
[[destination]]
name = "installs"
kind = "templated"
url = "https://a.example/i?idfa=(idfa)"
[[destination.routes]]
type = "install"

[[destination]]
name = "purchases"
kind = "templated"
url = "https://b.example/e?e=(event-name)"
[[destination.routes]]
type = "event"
events = ["af_purchase"]
max_delivery_attempts = 2

[[destination]]
name = "everything-later"
kind = "templated"
url = "https://c.example/e?e=(event-name)"
[[destination.routes]]
type = "install"
delay_seconds = 120
[[destination.routes]]
type = "event"
delay_seconds = 300
"""


def event(**overrides: Any) -> dict[str, Any]:
    base = {
        "event_id": "evt-1",
        "app_id": "id123456789",
        "platform": "ios",
        "event_name": "install",
        "event_time": "2026-11-22T10:00:00Z",
        "idfa": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
    }
    return {**base, **overrides}


@pytest.fixture
def producer(
    make_producer: Callable[[Path], Producer],
    write_destinations: Callable[[str], Path],
) -> Producer:
    return make_producer(write_destinations(DESTINATIONS))


def queued_envelopes(client: redis.Redis) -> list[DeliveryEnvelope]:
    return [
        DeliveryEnvelope.from_task_arg(decode_task_args(raw.decode())[1][0])
        for raw in client.lrange(QUEUE, 0, -1)
    ]


def test_install_goes_to_the_install_destination_now_and_to_the_delayed_one_later(
    producer: Producer, redis_client: redis.Redis
) -> None:
    before = time.time()
    result = producer.produce(event())

    expected_now = delivery_id_for("evt-1", "installs")
    expected_later = delivery_id_for("evt-1", "everything-later")
    assert sorted(result.accepted) == sorted([expected_now, expected_later])
    assert result.duplicates == []
    assert result.destinations == {expected_now: "installs", expected_later: "everything-later"}

    (envelope,) = queued_envelopes(redis_client)
    assert envelope.delivery_id == expected_now
    assert envelope.destination == "installs"
    assert envelope.kind == "templated"
    assert envelope.attempt == 0
    assert envelope.max_attempts == 1 + 5  # destination default retry.max_attempts
    assert envelope.event.idfa == "6D92078A-8246-4BA4-AE5B-76104861E7DC"

    delayed = redis_client.zrange(KEYS.delayed(QUEUE), 0, -1, withscores=True)
    assert len(delayed) == 1
    member, due = delayed[0]
    assert before + 120 <= due <= time.time() + 120
    headers, args = decode_task_args(member.decode())
    assert args[0]["destination"] == "everything-later"
    assert headers["task"] == task_name_for("templated")


def test_route_max_delivery_attempts_overrides_the_destination_policy(
    producer: Producer, redis_client: redis.Redis
) -> None:
    producer.produce(event(event_name="af_purchase", revenue="1.99", currency="USD"))
    (envelope,) = queued_envelopes(redis_client)
    assert envelope.destination == "purchases"
    assert envelope.max_attempts == 3


def test_the_same_event_twice_is_enqueued_once_per_destination(
    producer: Producer, redis_client: redis.Redis
) -> None:
    first = producer.produce(event())
    second = producer.produce(event())
    assert second.accepted == []
    assert sorted(second.duplicates) == sorted(first.accepted)
    assert redis_client.llen(QUEUE) == 1
    assert redis_client.zcard(KEYS.delayed(QUEUE)) == 1
    ttl = redis_client.ttl(KEYS.dedupe(first.accepted[0]))
    assert 7 * 24 * 3600 - 5 <= ttl <= 7 * 24 * 3600


def test_invalid_event_raises_naming_the_field_and_enqueues_nothing(
    producer: Producer, redis_client: redis.Redis
) -> None:
    with pytest.raises(InvalidEvent, match=r"country: must be an ISO 3166-1 alpha-2"):
        producer.produce(event(country="XX"))
    assert redis_client.dbsize() == 0


def test_an_event_no_route_wants_is_accepted_with_no_deliveries(
    producer: Producer, redis_client: redis.Redis
) -> None:
    result = producer.produce(
        event(
            event_name="af_level_achieved",
            platform="android",
            app_id="com.example.game",
            idfa=None,
            gaid="6D92078A-8246-4BA4-AE5B-76104861E7DC",
        )
    )
    assert result.ok
    assert len(result.accepted) == 1  # only everything-later wants any event
    assert redis_client.llen(QUEUE) == 0


def test_produce_many_reports_per_item_and_uses_one_round_trip(
    producer: Producer, redis_client: redis.Redis
) -> None:
    producer.settings = producer.settings.model_copy(update={"batch_size": 1})  # a message each
    events = [event(event_id=f"e{i}") for i in range(100)]
    events[7] = event(event_id="bad", idfa="not-a-uuid")
    events[42] = event(event_id="e0")  # duplicate of the first, inside the same batch
    calls_before = _evalsha_calls(redis_client)

    results = producer.produce_many(events)

    assert _evalsha_calls(redis_client) - calls_before == 1
    assert len(results) == 100
    assert results[7].error is not None
    assert "idfa: must be a UUID" in results[7].error
    assert results[7].event_id == "bad"
    assert results[7].accepted == []
    assert results[42].accepted == []
    assert len(results[42].duplicates) == 2
    assert all(r.ok for i, r in enumerate(results) if i != 7)
    assert redis_client.llen(QUEUE) == 98  # 100 - bad - duplicate
    assert redis_client.zcard(KEYS.delayed(QUEUE)) == 98


def _evalsha_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    # A fresh server answers the first EVALSHA with NOSCRIPT (a failed call) and redis-py
    # loads the script and calls again: only the calls that ran count.
    return sum(
        v["calls"] - v.get("failed_calls", 0) - v.get("rejected_calls", 0)
        for k, v in stats.items()
        if k in {"cmdstat_evalsha", "cmdstat_eval"}
    )


def test_wire_message_has_the_shape_celery_itself_publishes(
    producer: Producer, redis_client: redis.Redis, redis_url: str
) -> None:
    """Our Lua-enqueued message and one Celery publishes itself carry the same fields."""
    producer.produce(event())
    ours = json.loads(redis_client.rpop(QUEUE))  # type: ignore[arg-type]

    app = Celery("reference", broker=redis_url, set_as_current=False)
    app.send_task(task_name_for("templated"), args=({"x": 1},), queue=QUEUE)
    theirs = json.loads(redis_client.rpop(QUEUE))  # type: ignore[arg-type]
    app.close()

    assert set(ours) == set(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    for key in ("delivery_mode", "priority", "body_encoding", "delivery_info"):
        assert ours["properties"][key] == theirs["properties"][key] or key == "delivery_info"
    assert ours["properties"]["delivery_info"]["routing_key"] == QUEUE
    assert ours["content-type"] == theirs["content-type"] == "application/json"
    assert ours["headers"]["argsrepr"].startswith("{'delivery_id'")
    assert "6D92078A" not in ours["headers"]["argsrepr"]


def test_messages_laid_out_once_differ_only_in_their_own_values() -> None:
    """The cached layout fills in the task id (three places), argsrepr, body and delivery tag;
    each message reads back with exactly its own values, quotes and non-ASCII included."""
    encoder = TaskMessageEncoder(Celery("layout", set_as_current=False))
    first = json.loads(encoder.encode("t.name", "q1", ({"a": 1},), "{'x': \"ü\"}", "id-1"))
    second = json.loads(encoder.encode("t.name", "q1", (["b"],), "plain", "id-2"))
    other_queue = json.loads(encoder.encode("t.name", "q2", ([],), "r"))

    for message, task_id, args, argsrepr in (
        (first, "id-1", [{"a": 1}], "{'x': \"ü\"}"),
        (second, "id-2", [["b"]], "plain"),
    ):
        headers, decoded_args = decode_task_args(json.dumps(message))
        assert headers["id"] == headers["root_id"] == task_id
        assert message["properties"]["correlation_id"] == task_id
        assert headers["argsrepr"] == argsrepr
        assert decoded_args == args
        assert json.loads(base64.b64decode(message["body"]))[1:] == [
            {},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
        ]
    assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]
    assert other_queue["properties"]["delivery_info"]["routing_key"] == "q2"
    assert len(other_queue["headers"]["id"]) == 36  # a fresh uuid when none is given

    def strip(message: dict[str, Any]) -> dict[str, Any]:
        message = json.loads(json.dumps(message))
        for key in ("id", "root_id", "argsrepr"):
            message["headers"].pop(key)
        for key in ("correlation_id", "delivery_tag"):
            message["properties"].pop(key)
        message.pop("body")
        return message

    assert strip(first) == strip(second)


def test_module_level_produce_builds_its_producer_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    redis_client: redis.Redis,
    write_destinations: Callable[[str], Path],
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("POSTBACK_RELAY_DESTINATIONS_FILE", str(write_destinations(DESTINATIONS)))
    set_default_producer(None)
    try:
        result = producers.produce(event(event_id="from-env"))
        assert delivery_id_for("from-env", "installs") in result.accepted
        assert redis_client.llen(QUEUE) == 1
    finally:
        set_default_producer(None)
