"""produce() with POSTBACK_RELAY_PRODUCE_WAIT_REPLICAS against a real master and replica: it
returns once the replica has the write, raises NotReplicated when the replica cannot answer,
and producing the same event again is then safe (one message, and a duplicate waits too)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from config.destinations import load_destinations
from config.keys import RedisKeys, queue_for
from config.settings import Settings
from producers import NotReplicated
from producers.produce import Producer
from tests.helpers import INSTALL, net_destination_toml
from workers.dev.redis_topology import Node, RedisTopology

QUEUE = queue_for("templated")
KEYS = RedisKeys("pr")


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTopology]:
    with RedisTopology(tmp_path_factory.mktemp("replicated"), replicas=1, sentinels=0) as t:
        yield t


@pytest.fixture
def master(topology: RedisTopology) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(topology.first_master_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def replica(topology: RedisTopology) -> Node:
    return Node(topology.nodes[1].port)


@pytest.fixture
def make(topology: RedisTopology, master: redis.Redis, tmp_path: Path) -> Callable[..., Producer]:
    path = tmp_path / "destinations.toml"
    path.write_text(net_destination_toml("http://127.0.0.1:9"))

    def make(replicas: int, timeout_ms: int = 300) -> Producer:
        settings = Settings(
            redis_url=topology.first_master_url,
            destinations_file=path,
            produce_wait_replicas=replicas,
            produce_wait_timeout_ms=timeout_ms,
        )
        return Producer(settings, load_destinations(path), master)

    return make


@pytest.fixture
def stopped(topology: RedisTopology) -> Iterator[Callable[[], None]]:
    """SIGSTOP the replica (it stays connected but acknowledges nothing); resumed at teardown."""
    pid = topology.nodes[1].process.pid  # type: ignore[union-attr]

    def stop() -> None:
        os.kill(pid, signal.SIGSTOP)

    yield stop
    os.kill(pid, signal.SIGCONT)


def test_produce_returns_once_the_replica_has_the_event(
    make: Callable[..., Producer], replica: Node
) -> None:
    result = make(replicas=1).produce(INSTALL)
    (delivery_id,) = result.accepted
    # Read from the replica at once: WAIT returned only after it acknowledged the write.
    on_replica = replica.client()
    assert on_replica.llen(QUEUE) == 1
    assert on_replica.exists(KEYS.dedupe(delivery_id)) == 1
    assert on_replica.zscore(KEYS.ledger(), delivery_id) is not None


def test_too_few_replicas_raise_and_producing_again_enqueues_once(
    make: Callable[..., Producer],
    master: redis.Redis,
    replica: Node,
    stopped: Callable[[], None],
    topology: RedisTopology,
) -> None:
    producer = make(replicas=1, timeout_ms=200)
    stopped()
    with pytest.raises(NotReplicated) as raised:
        producer.produce(INSTALL)
    message = str(raised.value)
    print(f"\n{message}")
    assert "only 0 of the 1 replica(s)" in message
    assert "POSTBACK_RELAY_PRODUCE_WAIT_REPLICAS" in message
    assert "same event_id" in message
    assert master.llen(QUEUE) == 1  # the master kept it: "may or may not" survive a failover
    os.kill(topology.nodes[1].process.pid, signal.SIGCONT)  # type: ignore[union-attr]

    again = producer.produce(INSTALL)  # the caller's retry, as the error says
    assert again.accepted == []
    assert len(again.duplicates) == 1
    assert master.llen(QUEUE) == 1
    assert replica.client().llen(QUEUE) == 1


def test_a_duplicate_waits_for_the_replicas_too(
    make: Callable[..., Producer], stopped: Callable[[], None]
) -> None:
    """A duplicate writes nothing, and Redis documents WAIT as covering only what its own
    connection wrote: the event's first write may still be on the master alone, so the
    producer writes a mark and waits for that. (Redis 6.2 and 7.0 answer a WAIT after a
    write-less command conservatively too; this holds the producer to waiting at all.)"""
    producer = make(replicas=1, timeout_ms=200)
    assert producer.produce(INSTALL).accepted
    stopped()
    with pytest.raises(NotReplicated):
        producer.produce(INSTALL)


def test_a_master_without_the_script_loads_it(
    make: Callable[..., Producer], master: redis.Redis
) -> None:
    producer = make(replicas=1)
    master.script_flush()  # as a newly promoted master that never ran it
    assert producer.produce(INSTALL).accepted
    assert master.llen(QUEUE) == 1


def test_without_the_option_nothing_waits(
    make: Callable[..., Producer], master: redis.Redis, stopped: Callable[[], None]
) -> None:
    stopped()
    assert make(replicas=0).produce(INSTALL).accepted
    assert master.llen(QUEUE) == 1


def test_a_wait_timeout_of_zero_is_refused_naming_the_setting() -> None:
    # WAIT n 0 would block produce() for ever while a replica is down.
    with pytest.raises(ValidationError, match="produce_wait_timeout_ms"):
        Settings(produce_wait_timeout_ms=0)
