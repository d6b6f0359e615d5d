"""Separate broker and state instances: every writer puts its keys where config/keys.py says,
writes the state first, and what the broker missed reaches it through the ledger's sweep.

Two real redis-server processes of our own (AOF ``appendfsync always``); kombu reads the
messages back off the broker. The same scenarios under load, with each instance SIGKILLed and
restarted: tests/failure/test_split_instances.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu import Connection

from config.destinations import load_destinations
from config.keys import RedisKeys, queue_for, task_name_for
from config.settings import Settings
from producers.produce import Producer
from schemas.envelope import DeliveryEnvelope
from tests.helpers import NOW_AND_LATER
from workers.broker.keys import queue_list
from workers.broker.publish import Enqueue, EnqueueOnce
from workers.broker.wire import TaskMessageEncoder
from workers.dev.embedded_redis import EmbeddedRedis, free_port
from workers.stores.deadletter import DeadLetterStore
from workers.stores.delay import DelaySet
from workers.stores.ledger import DeliveryLedger
from workers.stores.requeue import Requeuer

KEYS = RedisKeys("pr")
QUEUE = queue_for("templated")
# What the broker instance may hold (config/keys.py): kombu's keys and two of ours.
BROKER_KEYS = {QUEUE, "unacked", "unacked_index", KEYS.delayed(QUEUE), KEYS.ledger_drained()}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, EmbeddedRedis]]:
    base = tmp_path_factory.mktemp("split")
    pair = {"broker": EmbeddedRedis(base / "broker"), "state": EmbeddedRedis(base / "state")}
    try:
        for server in pair.values():
            server.start()
        yield pair
    finally:
        for server in pair.values():
            server.stop()


@pytest.fixture
def broker(servers: dict[str, EmbeddedRedis]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(servers["broker"].url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def state(servers: dict[str, EmbeddedRedis]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(servers["state"].url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def producer_for(
    write_destinations: Callable[[str], Path],
) -> Callable[..., Producer]:
    def make(state: redis.Redis, broker: redis.Redis, batch_size: int = 1) -> Producer:
        path = write_destinations(NOW_AND_LATER)
        settings = Settings(destinations_file=path, ledger_lease=60, batch_size=batch_size)
        return Producer(settings, load_destinations(path), state, broker)

    return make


def install(event_id: str) -> dict[str, str]:
    return {"event_id": event_id, "app_id": "id1", "platform": "ios", "event_name": "install",
            "event_time": "2026-11-22T10:00:00Z"}  # fmt: skip


def take(broker_url: str) -> tuple[str, DeliveryEnvelope]:
    """The next message on the broker's queue, read by kombu's own Redis channel."""
    with Connection(broker_url) as conn:
        queue = conn.SimpleQueue(QUEUE, no_ack=True)
        message = queue.get(timeout=2)
        args, _kwargs, _embed = message.decode()
        assert message.headers["task"] == task_name_for("templated")
        queue.close()
        return message.headers["id"], DeliveryEnvelope.from_task_arg(args[0])


def key_names(client: redis.Redis) -> set[str]:
    return {k.decode() for k in client.scan_iter(count=1000)}


def test_every_writer_keeps_messages_on_the_broker_and_the_rest_on_the_state_instance(
    producer_for: Callable[..., Producer],
    broker: redis.Redis,
    state: redis.Redis,
    servers: dict[str, EmbeddedRedis],
) -> None:
    url = servers["broker"].url
    encoder = TaskMessageEncoder(Celery("postback_relay", set_as_current=False))
    delays = DelaySet(broker, KEYS)
    ledger = DeliveryLedger(state, KEYS, lease_seconds=1, broker=broker)

    # 1. produce(): claims and ledger on the state, one message now and one delayed.
    result = producer_for(state, broker).produce(install("e1"))
    assert len(result.accepted) == 2
    assert state.zcard(KEYS.ledger()) == 2
    assert broker.llen(QUEUE) == 1
    assert broker.zcard(KEYS.delayed(QUEUE)) == 1
    task_id, envelope = take(url)
    assert task_id == envelope.delivery_id
    assert envelope.destination == "now"
    # 2. the delay mover (broker only).
    assert delays.move_due([QUEUE], now=time.time() + 120) == 1
    assert take(url)[1].destination == "later"
    # 3. the requeue after a retry: parked in the state's ledger, published on the broker.
    Requeuer(broker, delays, encoder, ledger).later(envelope.model_copy(update={"attempt": 1}), 0)
    task_id, again = take(url)
    assert (task_id, again.attempt) == (f"{envelope.delivery_id}.1", 1)
    assert state.hget(KEYS.ledger_messages(), envelope.delivery_id).startswith(QUEUE.encode())  # type: ignore[union-attr]
    # 4. the ledger sweep: drained on the broker, taken from the state, published on the broker.
    assert ledger.sweep(now=time.time() + 200, queues=[QUEUE]) == 2  # "now" and "later"
    swept = {take(url)[1].delivery_id for _ in range(2)}
    assert swept == set(result.accepted)
    assert ledger.sweep(now=time.time() + 200, queues=[QUEUE]) == 0  # taken: not again yet
    # 5. dead-letter replay: the entry becomes a ledger entry, then the message goes out.
    store = DeadLetterStore(state, KEYS, broker, ledger_lease_seconds=60)
    entry = store.add_envelope(envelope, "HTTP 500")
    wire = encoder.encode_envelope(envelope, task_id=f"{envelope.delivery_id}.replay")
    state.delete(KEYS.ledger(), KEYS.ledger_messages())
    assert store.replay_one(entry, envelope, wire)
    assert not store.replay_one(entry, envelope, wire)  # replayed once
    assert take(url) == (f"{envelope.delivery_id}.replay", envelope)
    assert store.count() == 0
    assert state.hget(KEYS.ledger_messages(), envelope.delivery_id) == f"{QUEUE}\n{wire}".encode()
    # 6. the reconciler's claim-once enqueue.
    enqueue = EnqueueOnce(state, KEYS, 60, broker=broker)
    item = Enqueue(KEYS.reconciled("main", "id"), QUEUE, False, time.time(), wire, "d-rec", QUEUE)
    assert enqueue([item, item], 60) == [True, False]
    assert take(url)[1] == envelope
    assert broker.llen(QUEUE) == 0

    on_broker, on_state = key_names(broker), key_names(state)
    on_broker = {k for k in on_broker if not k.startswith("_kombu.")}  # kombu's bindings
    assert on_broker <= BROKER_KEYS, on_broker - BROKER_KEYS
    assert on_state.isdisjoint(BROKER_KEYS), on_state & BROKER_KEYS
    assert all(k.startswith(KEYS.tag) for k in on_state)
    assert {KEYS.ledger(), KEYS.dedupe(envelope.delivery_id), KEYS.dead_letter_counts()} <= on_state


def test_produce_many_sends_a_batch_message_only_when_every_member_is_new(
    producer_for: Callable[..., Producer], broker: redis.Redis, state: redis.Redis
) -> None:
    producer = producer_for(state, broker, batch_size=3)
    producer.produce(install("b1"))  # b1's deliveries are claimed already
    broker.delete(QUEUE, KEYS.delayed(QUEUE))
    results = producer.produce_many(install(f"b{i}") for i in range(1, 4))
    assert [len(r.accepted) for r in results] == [0, 2, 2]
    # b1 was in their batch: b2 and b3's "now" deliveries go out alone, as in one instance.
    assert broker.llen(QUEUE) == 2
    assert broker.zcard(KEYS.delayed(QUEUE)) == 2
    assert state.zcard(KEYS.ledger()) == 6  # each delivery keeps its own entry
    producer.produce_many(install(f"c{i}") for i in range(3))
    assert broker.llen(QUEUE) == 3  # one more: the three new ones in one message


def test_produce_while_the_state_is_down_raises_and_publishes_nothing(
    producer_for: Callable[..., Producer], broker: redis.Redis
) -> None:
    nowhere = redis.Redis(port=free_port(), socket_connect_timeout=1)
    producer = producer_for(nowhere, broker)
    with pytest.raises(redis.ConnectionError):
        producer.produce(install("e1"))
    assert key_names(broker) == set()


def test_produce_while_the_broker_is_down_is_accepted_and_the_sweep_delivers_it(
    producer_for: Callable[..., Producer],
    state: redis.Redis,
    tmp_path: Path,
) -> None:
    """The state write went through, the broker push did not: produce() returns the
    deliveries as accepted, the ledger holds them, marked unpublished, and once the broker is
    back (its AOF replayed) each is published once, without the sweep's hold; the delayed one
    waits for its delay, then the sweep publishes it."""
    server = EmbeddedRedis(tmp_path / "broker").start()
    try:
        broker = redis.Redis.from_url(server.url, socket_connect_timeout=1)
        producer = producer_for(state, broker)
        server.kill()
        before = time.time()
        result = producer.produce(install("e1"))
        assert len(result.accepted) == 2
        assert result.ok
        assert producer.produce(install("e1")).duplicates == result.accepted
        deadlines = dict(state.zrange(KEYS.ledger(), 0, -1, withscores=True))
        now_id, later_id = (f"{d}" for d in result.accepted)  # routes in file order
        assert state.smembers(KEYS.ledger_unpublished()) == {now_id.encode()}
        assert before + 60 <= deadlines[later_id.encode()] <= time.time() + 60  # its delay's end

        ledger = DeliveryLedger(state, KEYS, lease_seconds=60, broker=broker)
        with pytest.raises(redis.ConnectionError):  # still down: marked again for next time
            ledger.publish_unpublished()
        assert state.smembers(KEYS.ledger_unpublished()) == {now_id.encode()}
        server.start()  # the same port, the same client object
        assert ledger.sweep(queues=[QUEUE]) == 0  # nothing due: the lease has not passed
        assert ledger.publish_unpublished() == 1
        assert ledger.publish_unpublished() == 0
        assert take(server.url)[1].delivery_id == now_id
        with state.pipeline() as pipe:  # delivered: its worker settles it
            ledger.settle(pipe, now_id)
            pipe.execute()
        assert ledger.sweep(now=time.time() + 61, queues=[QUEUE]) == 1
        assert take(server.url)[1].delivery_id == later_id
    finally:
        server.stop()


def test_a_replay_while_the_broker_is_down_is_kept_by_the_ledger(
    state: redis.Redis, tmp_path: Path
) -> None:
    server = EmbeddedRedis(tmp_path / "broker").start()
    try:
        broker = redis.Redis.from_url(server.url, socket_connect_timeout=1)
        encoder = TaskMessageEncoder(Celery("postback_relay", set_as_current=False))
        store = DeadLetterStore(state, KEYS, broker, ledger_lease_seconds=30)
        envelope = _envelope()
        entry = store.add_envelope(envelope, "HTTP 500")
        server.kill()
        wire = encoder.encode_envelope(envelope, task_id="r1")
        assert store.replay_one(entry, envelope, wire)  # replayed: the ledger has it
        assert store.count() == 0
        server.start()
        ledger = DeliveryLedger(state, KEYS, lease_seconds=30, broker=broker)
        assert ledger.publish_unpublished() == 1
        assert take(server.url) == ("r1", envelope)
        state.srem(KEYS.ledger_unpublished(), "d-replay")  # without the mark: the sweep's way
        assert store.replay_one(store.add_envelope(envelope, "again"), envelope, wire)
        broker.delete(QUEUE)  # lost
        assert ledger.sweep(queues=[QUEUE]) == 0  # within its lease: maybe on its way
        assert ledger.sweep(now=time.time() + 31, queues=[QUEUE]) == 1
        assert take(server.url) == ("r1", envelope)
    finally:
        server.stop()


def test_split_sweep_waits_for_the_hold_and_a_backlog(
    broker: redis.Redis, state: redis.Redis
) -> None:
    ledger = DeliveryLedger(state, KEYS, lease_seconds=30, drained_hold_seconds=60, broker=broker)
    state.zadd(KEYS.ledger(), {"late": 1.0})
    state.hset(KEYS.ledger_messages(), "late", f"{QUEUE}\nlate-message")
    broker.lpush(QUEUE, "backlog")
    assert ledger.sweep(now=100.0) == 0  # a backlog: waiting
    broker.delete(QUEUE)
    assert ledger.sweep(now=101.0) == 0  # drained, the hold starts
    assert ledger.sweep(now=160.0) == 0
    assert ledger.sweep(now=161.0) == 1
    assert broker.lrange(queue_list(QUEUE), 0, -1) == [b"late-message"]
    assert not broker.hexists(KEYS.ledger_drained(), QUEUE)  # refilled: a new hold next time
    assert state.zscore(KEYS.ledger(), "late") == 191.0
    state.hdel(KEYS.ledger_messages(), "late")  # settled meanwhile: its entry goes
    assert ledger.sweep(now=300.0) == 0
    assert state.zcard(KEYS.ledger()) == 0


def _envelope() -> DeliveryEnvelope:
    from datetime import UTC, datetime, timedelta

    from schemas.event import ConversionEvent

    now = datetime.now(UTC)
    return DeliveryEnvelope(
        delivery_id="d-replay",
        destination="now",
        kind="templated",
        event=ConversionEvent.parse(install("e-replay")),
        attempt=2,
        max_attempts=3,
        created_at=now,
        not_after=now + timedelta(hours=1),
    )


def test_the_runtime_gives_each_store_the_instance_that_holds_its_keys(
    servers: dict[str, EmbeddedRedis], write_destinations: Callable[[str], Path]
) -> None:
    from workers.runtime import WorkerRuntime

    path = write_destinations(NOW_AND_LATER)
    settings = Settings(
        redis_url=servers["broker"].url,
        state_redis_url=servers["state"].url,
        destinations_file=path,
    )
    runtime = WorkerRuntime(settings, load_destinations(path), Celery(set_as_current=False))
    broker, state = runtime.broker_redis, runtime.redis
    assert broker is not state
    assert broker.connection_pool.connection_kwargs["port"] == servers["broker"].port
    assert state.connection_pool.connection_kwargs["port"] == servers["state"].port
    assert runtime.delays.redis is broker
    assert runtime.requeuer.redis is broker
    assert (runtime.ledger.redis, runtime.ledger.broker) == (state, broker)
    assert (runtime.dead_letters.redis, runtime.dead_letters.broker) == (state, broker)
    for store in (runtime.pipeline, runtime.attempts, runtime.pauses, runtime.reconciler):
        assert store.redis is state
    assert runtime.reconciler._enqueue_once.broker is broker
    producer = Producer.from_settings(settings)
    assert producer._enqueue.broker is not producer.redis
    assert producer.redis.connection_pool.connection_kwargs["port"] == servers["state"].port


HANDSHAKE = {"HELLO", "CLIENT", "AUTH", "SELECT", "PING"}  # a new connection's, not a write


def commands_of(client: redis.Redis, action: Callable[[], object]) -> list[str]:
    """The commands a client sent (not those its scripts ran) while ``action`` ran (MONITOR)."""
    marker = f"end-{time.monotonic_ns()}"
    sent: list[str] = []
    with client.monitor() as monitor:
        action()
        client.echo(marker)
        for event in monitor.listen():
            if event["command"] == f"ECHO {marker}":
                return sent
            name = event["command"].split()[0].upper()
            if event.get("client_type") != "lua" and name not in HANDSHAKE:
                sent.append(name)
    return sent


def test_one_instance_keeps_produce_one_atomic_script(
    broker: redis.Redis, state: redis.Redis, producer_for: Callable[..., Producer]
) -> None:
    """One instance (one client object): claims, ledger and queue push are one EVALSHA, as
    before the split. Two: a script on the state, then one MULTI/EXEC on the broker."""
    shared = producer_for(state, state)
    shared.produce(install("warm"))  # the script is loaded
    assert commands_of(state, lambda: shared.produce(install("e1"))) == ["EVALSHA"]
    assert state.llen(QUEUE) == 2
    split = producer_for(state, broker)
    split.produce(install("warm"))
    assert commands_of(state, lambda: split.produce(install("e2"))) == ["EVALSHA"]
    assert commands_of(broker, lambda: split.produce(install("e3"))) == [
        "MULTI", "LPUSH", "ZADD", "EXEC"
    ]  # fmt: skip
