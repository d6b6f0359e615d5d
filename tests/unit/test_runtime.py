"""The worker's composition root: each object built once, and a path that needs only Redis
(dead-lettering a poison message) building neither the delivery pipeline nor its HTTP session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import workers.runtime
from config.settings import Settings
from workers.app import create_app
from workers.broker.consumer import DeadLetteringConsumer
from workers.runtime import WorkerRuntime, built_once

QUEUE = "postback_relay.templated"


@pytest.fixture
def runtime(
    net_destination: Path,
    make_runtime: Callable[[Path], WorkerRuntime],
    monkeypatch: pytest.MonkeyPatch,
) -> WorkerRuntime:
    """A runtime that fails the test if anything builds the pipeline or an HTTP session."""

    def must_not_build(*_: Any, **__: Any) -> Any:
        raise AssertionError("dead-lettering a poison message built the delivery pipeline")

    monkeypatch.setattr(workers.runtime, "DeliveryPipeline", must_not_build)
    monkeypatch.setattr(workers.runtime, "http_session", must_not_build)
    monkeypatch.setattr(workers.runtime, "http_client", must_not_build)
    return make_runtime(net_destination)


def test_an_unreadable_queue_item_is_dead_lettered_without_building_the_pipeline(
    runtime: WorkerRuntime,
) -> None:
    entry = runtime.keep_unreadable_item(QUEUE, b"\xff\x00 not json", "cannot decode", "m-1")

    kept = runtime.dead_letters.get(entry.delivery_id)
    assert kept is not None
    assert kept.delivery_id == "poison-m-1"
    assert kept.queue == QUEUE
    assert kept.raw_bytes() == b"\xff\x00 not json"
    assert kept.reason == "poison message: cannot decode"


def test_the_consumer_dead_letters_an_unknown_message_without_building_the_pipeline(
    runtime: WorkerRuntime,
) -> None:
    consumer = DeadLetteringConsumer.__new__(DeadLetteringConsumer)
    consumer.app = SimpleNamespace(runtime=runtime)
    acked = []
    message = SimpleNamespace(
        headers={"id": "m-2"},
        delivery_info={"routing_key": QUEUE},
        body=b'{"not": "a task"}',
        ack=lambda: acked.append(True),
    )

    consumer.on_unknown_message(message.body, message)

    kept = runtime.dead_letters.get("poison-m-2")
    assert kept is not None
    assert (kept.queue, kept.raw_bytes()) == (QUEUE, b'{"not": "a task"}')
    assert kept.reason == "poison message: not a Celery task message"
    assert acked == [True]


def test_a_task_argument_that_is_no_envelope_is_dead_lettered_without_building_the_pipeline(
    runtime: WorkerRuntime,
) -> None:
    result = runtime.deliver({"destination": "net", "not": "an envelope"}, "t-1")

    assert result.status == "dead_lettered"
    kept = runtime.dead_letters.get("poison-t-1")
    assert kept is not None
    assert kept.destination == "net"


def test_creating_the_app_builds_nothing_of_the_runtime(
    net_destination: Path, redis_url: str
) -> None:
    """The app is created before the pool forks: a client built then would cross the fork."""
    app = create_app(Settings(redis_url=redis_url, destinations_file=net_destination))
    built = {name for name, value in vars(WorkerRuntime).items() if isinstance(value, built_once)}
    assert {"redis", "broker_redis", "http", "sender", "session", "pipeline", "dead_letters",
            "reconciler"} <= built  # fmt: skip
    assert built.isdisjoint(vars(app.runtime))


def test_each_object_is_built_once_and_shared(
    net_destination: Path, make_runtime: Callable[[Path], WorkerRuntime]
) -> None:
    runtime = make_runtime(net_destination)
    pipeline = runtime.pipeline
    assert runtime.pipeline is pipeline
    assert pipeline.dead_letters is runtime.dead_letters
    assert pipeline.ledger is runtime.ledger
    assert pipeline.sender is runtime.sender
    assert runtime.xmp_flusher.sender is runtime.sender
    assert pipeline.redis is runtime.redis
    assert runtime.broker_redis is runtime.redis  # one instance unless the state has its own
    reconciler = runtime.reconciler
    assert (reconciler.encoder, reconciler.delays) == (runtime.encoder, runtime.delays)
    assert reconciler.redis is runtime.redis
    # Looked up on the class, an attribute is its descriptor (introspection builds nothing).
    assert isinstance(WorkerRuntime.pipeline, built_once)
