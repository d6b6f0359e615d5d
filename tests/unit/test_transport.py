"""Our kombu transport: one redis-py client per channel instead of one per publish or ack."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import structlog
from kombu import Connection

from config.redis import RedisSettings
from config.settings import Settings
from workers import redis_clients
from workers.app import create_app
from workers.broker import transport as broker_transport
from workers.broker.acks import AckWriting
from workers.broker.transport import ACK_BATCH
from workers.dev.embedded_redis import free_port
from workers.redis_clients import TRANSPORT


def settings_for(redis_url: str, tmp_path: Path, **values: Any) -> Settings:
    """Settings for an app with no destinations (these tests only look at the transport)."""
    destinations = tmp_path / "destinations.toml"
    destinations.write_text("")
    return Settings(redis_url=redis_url, destinations_file=destinations, **values)


@pytest.fixture
def connection(redis_url: str, redis_client: redis.Redis) -> Iterator[Connection]:
    with Connection(redis_url, transport=TRANSPORT) as conn:
        yield conn


def test_a_channel_reuses_one_client_over_its_pool(connection: Connection) -> None:
    channel = connection.default_channel
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second
        assert first.connection_pool is channel.pool
    given = redis.Redis(connection_pool=channel.pool)
    with channel.conn_or_acquire(given) as client:
        assert client is given  # a caller's own client is used as is


def test_a_new_pool_gets_a_new_client(connection: Connection) -> None:
    channel = connection.default_channel
    with channel.conn_or_acquire() as before:
        pass
    channel._pool = None  # what a reconnect leaves behind: the next use builds a new pool
    with channel.conn_or_acquire() as after:
        assert after is not before
        assert after.connection_pool is channel.pool


def test_messages_still_go_round_trip_with_acks(connection: Connection) -> None:
    queue = connection.SimpleQueue("transport-test")
    try:
        for i in range(20):
            queue.put({"n": i})
        got = []
        for _ in range(20):
            message = queue.get(timeout=5)
            got.append(message.payload["n"])
            message.ack()
        assert got == list(range(20))
        # Acked (the held acks written): nothing is left in kombu's unacked hash to be restored.
        connection.transport.write_held_acks()
        client = connection.default_channel.client
        assert client.hlen(connection.default_channel.unacked_key) == 0
    finally:
        queue.clear()
        queue.close()


@pytest.mark.parametrize(("visibility", "expected"), [(10, 5), (3600, 300)])
def test_a_restore_lock_left_by_a_dead_worker_expires_within_half_the_visibility_timeout(
    visibility: int, expected: int, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """kombu restores a dead worker's messages under a Redis lock (5 minutes by default). A
    worker killed while holding it, likely with gevent, whose loop restores on every idle poll,
    would hold every restore back that long; the app's lock expires after half the timeout."""
    settings = settings_for(
        redis_url,
        tmp_path,
        visibility_timeout=visibility,
        task_soft_time_limit=6,
        task_time_limit=8,
        http_connect_timeout=1,
        http_read_timeout=2,
    )
    app = create_app(settings)
    with app.connection_for_write() as conn:
        qos = conn.default_channel.qos
        assert qos.unacked_mutex_expire == expected
        # What the worker leaves behind when it dies inside kombu's restore: the lock, taken as
        # kombu takes it and never released.
        lock = redis_client.lock(qos.unacked_mutex_key, timeout=qos.unacked_mutex_expire)
        assert lock.acquire(blocking=False)
        assert 0 < redis_client.ttl(qos.unacked_mutex_key) <= expected


def test_the_blocking_loop_waits_one_brpop_at_a_time_so_a_shutdown_is_seen_sooner(
    connection: Connection,
) -> None:
    """Celery's gevent loop calls drain_events(timeout=2.0) and checks for SIGTERM in between."""
    queue = connection.SimpleQueue("transport-drain-test")
    try:
        queue.consumer.consume()
        transport = connection.transport
        waits: list[float | None] = []
        real_get = transport.cycle.get

        def get(callback: Any, timeout: float | None = None) -> Any:
            waits.append(timeout)
            return real_get(callback, timeout=timeout)

        transport.cycle.get = get
        with pytest.raises(socket.timeout):
            connection.drain_events(timeout=2.0)
        assert waits, "drain_events never polled"
        assert all(w == transport.brpop_timeout == 1 for w in waits)
    finally:
        queue.close()


@pytest.mark.parametrize(
    ("pool", "concurrency"), [("gevent", None), ("gevent", 256), ("threads", 4)]
)
def test_every_redis_pool_of_a_worker_is_sized_to_its_concurrency(
    pool: str, concurrency: int | None, redis_url: str, tmp_path: Path
) -> None:
    """kombu's channel pool (10 connections by default) failed acks under gevent; our own pools
    wait for a free connection instead of failing or growing without bound."""
    settings = settings_for(redis_url, tmp_path, worker_pool=pool, worker_concurrency=concurrency)
    # One connection per delivery in flight (concurrency x batch size, capped) plus 8 spares;
    # the formula is tested in tests/unit/test_batches.py.
    expected = settings.redis_pool_size
    assert settings.concurrency + 8 <= expected <= max(settings.concurrency, 256) + 8
    app = create_app(settings)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert channel.pool.max_connections == expected
        assert channel.async_pool.max_connections == expected
    own = redis_clients.client(settings.state_redis, pool_size=settings.redis_pool_size)
    assert isinstance(own.connection_pool, redis.BlockingConnectionPool)
    assert own.connection_pool.max_connections == expected
    limiter = app.runtime.pipeline.limiter
    assert limiter.redis.connection_pool is app.runtime.pipeline.redis.connection_pool
    # (the `limits` storage, a second client, is gone: reservations are one script on this one)


def test_kombu_restores_a_dead_workers_messages_after_the_derived_visibility_timeout(
    redis_url: str, tmp_path: Path
) -> None:
    app = create_app(settings_for(redis_url, tmp_path))
    with app.connection_for_write() as conn:
        qos = conn.default_channel.qos
        assert conn.default_channel.visibility_timeout == 300  # 4 x 60 s + 60 s, not 3600
        assert qos.unacked_mutex_expire == 150


class Kept:
    """An ``on_unreadable_item`` handler that records what it is given (or fails, if told)."""

    def __init__(self, fail: bool = False) -> None:
        self.items: list[tuple[str, bytes, str]] = []
        self.fail = fail

    def __call__(self, queue: str, item: bytes, reason: str) -> None:
        if self.fail:
            raise redis.ConnectionError("the state Redis is away")
        self.items.append((queue, item, reason))


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (b"\x00\xffthis is {not json", "not JSON"),
        (b'{"task": "postback_relay.deliver_templated", "args": [1]}', "not a kombu message"),
        (b"[1, 2, 3]", "not a kombu message"),
        (b'{"body": "", "properties": {"delivery_tag": "t"}}', "not a kombu message"),
        (
            b'{"body": "e30=", "properties": {"delivery_tag": "t", "body_encoding": "rot13", '
            b'"delivery_info": {"exchange": "", "routing_key": "q"}}}',
            "not a kombu message",
        ),
    ],
)
def test_an_item_kombu_cannot_decode_is_handed_over_raw_and_consuming_goes_on(
    item: bytes, reason: str, redis_url: str, redis_client: redis.Redis
) -> None:
    kept = Kept()
    options = {"on_unreadable_item": kept}
    with Connection(redis_url, transport=TRANSPORT, transport_options=options) as conn:
        queue = conn.SimpleQueue("transport-poison")
        redis_client.lpush("transport-poison", item)
        queue.put({"n": 1})  # behind it, a good message
        message = queue.get(timeout=10)
        message.ack()
        queue.close()
    assert message.payload == {"n": 1}
    assert [(q, i) for q, i, _ in kept.items] == [("transport-poison", item)]
    assert kept.items[0][2].startswith(reason)
    assert redis_client.llen("transport-poison") == 0


def test_an_error_after_kombu_decoded_the_item_is_not_taken_for_an_unreadable_item(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Only decoding errors are caught: a consumer's ValueError (a bug, say) propagates, and
    the message stays in kombu's unacked hash to be delivered again, not dead-lettered."""
    kept = Kept()

    def buggy(body: Any, message: Any) -> None:
        raise ValueError("a bug in whatever handles the message")

    options = {"on_unreadable_item": kept}
    with Connection(redis_url, transport=TRANSPORT, transport_options=options) as conn:
        queue = conn.SimpleQueue("transport-bug")
        queue.put({"n": 1})
        queue.consumer.register_callback(buggy)
        queue.consumer.consume()
        with pytest.raises(ValueError, match="a bug"):
            conn.drain_events(timeout=5)
        assert redis_client.hlen("unacked") == 1  # delivered, not acked
        queue.close()
    assert kept.items == []
    # Closing the channel put it back, whole, for another delivery.
    (restored,) = redis_client.lrange("transport-bug", 0, -1)
    assert json.loads(restored)["properties"]["delivery_tag"]


def test_an_unreadable_item_that_cannot_be_kept_goes_back_on_its_queue(
    redis_url: str, redis_client: redis.Redis
) -> None:
    item = b"\x00\xffnot json"
    kept = Kept(fail=True)
    options = {"on_unreadable_item": kept}
    with Connection(redis_url, transport=TRANSPORT, transport_options=options) as conn:
        queue = conn.SimpleQueue("transport-unkept")
        redis_client.lpush("transport-unkept", item)
        queue.put({"n": 1})
        message = queue.get(timeout=10)  # the good one goes on meanwhile
        message.ack()
        kept.fail = False
        with pytest.raises(queue.Empty):
            queue.get(timeout=2)  # the next try keeps it
        queue.close()
    assert [i for _, i, _ in kept.items] == [item]
    assert redis_client.llen("transport-unkept") == 0


def test_a_lost_plain_redis_is_left_to_celerys_backoff() -> None:
    """Only on sentinel:// does the transport look for a master again (a promotion is on its
    way there); a plain server that is down fails the attempt at once."""
    conf = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5)
    options = redis_clients.kombu_connection_options(conf)
    connection = Connection(
        options["broker_url"],
        transport=options["broker_transport"],
        transport_options=options["broker_transport_options"],
    )
    with structlog.testing.capture_logs() as logs, pytest.raises(redis.ConnectionError):
        connection.transport.establish_connection()
    assert [e for e in logs if e["event"] == "transport.waiting_for_master"] == []


@pytest.fixture
def acks_held_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """Acks written only by a full batch, a write or a close, however slowly a test runs."""
    monkeypatch.setattr(broker_transport, "ACK_WRITE_INTERVAL", 60.0)


def unacked(client: redis.Redis) -> tuple[int, int]:
    """(entries of kombu's unacked hash, entries of its index): a message not yet acked in Redis."""
    return client.hlen("unacked"), client.zcard("unacked_index")


def queue_of(connection: Connection, name: str, count: int) -> Any:
    """A queue holding ``count`` messages, {"n": 0} first."""
    queue = connection.SimpleQueue(name)
    for i in range(count):
        queue.put({"n": i})
    return queue


def take(queue: Any, count: int, ack: bool = True) -> list[Any]:
    messages = [queue.get(timeout=5) for _ in range(count)]
    for message in messages if ack else ():
        message.ack()
    return messages


@pytest.mark.usefixtures("acks_held_long")
def test_acks_are_held_until_a_write_puts_them_all_in_one_round_trip(
    connection: Connection, redis_client: redis.Redis
) -> None:
    queue = queue_of(connection, "held-acks", 10)
    take(queue, 10)
    assert unacked(redis_client) == (10, 10)  # acked for kombu, not yet in Redis
    assert connection.default_channel.qos.can_consume()  # nor held back from prefetching
    writes: list[list[str]] = []
    real_pipeline = redis.client.Pipeline.execute

    def execute(pipe: Any, *args: Any, **kwargs: Any) -> Any:
        writes.append([command[0][0] for command in pipe.command_stack])
        return real_pipeline(pipe, *args, **kwargs)

    redis.client.Pipeline.execute = execute  # type: ignore[method-assign]
    try:
        connection.transport.write_held_acks()
    finally:
        redis.client.Pipeline.execute = real_pipeline  # type: ignore[method-assign]
    assert writes == [["ZREM", "HDEL"]]  # ten acks, one pipeline of two commands
    assert unacked(redis_client) == (0, 0)
    queue.close()


@pytest.mark.usefixtures("acks_held_long")
def test_a_full_batch_of_acks_is_written_without_waiting(
    connection: Connection, redis_client: redis.Redis
) -> None:
    queue = queue_of(connection, "held-acks-batch", ACK_BATCH + 3)
    take(queue, ACK_BATCH - 1)
    assert unacked(redis_client) == (ACK_BATCH - 1, ACK_BATCH - 1)
    take(queue, 4)  # the first of these fills the batch: all of it is written
    assert unacked(redis_client) == (3, 3)  # the three acked since are held
    queue.close()


def test_an_ack_that_finds_the_oldest_held_long_enough_writes_them_all(
    connection: Connection, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While acks keep coming they write themselves: no timer has to wake the worker."""
    monkeypatch.setattr(broker_transport, "ACK_WRITE_INTERVAL", 0.3)
    queue = queue_of(connection, "held-acks-age", 3)
    first, second, third = take(queue, 3, ack=False)
    first.ack()
    second.ack()
    assert unacked(redis_client) == (3, 3)
    time.sleep(0.3)
    third.ack()
    assert unacked(redis_client) == (0, 0)
    queue.close()


@pytest.mark.usefixtures("acks_held_long")
def test_a_requeue_keeps_the_other_held_acks_and_is_never_written_as_acked(
    connection: Connection, redis_client: redis.Redis
) -> None:
    queue = queue_of(connection, "held-acks-requeue", 5)
    first, second, third, fourth, fifth = take(queue, 5, ack=False)
    for message in (first, second, fourth, fifth):
        message.ack()
    third.requeue()
    assert redis_client.llen("held-acks-requeue") == 1
    assert unacked(redis_client) == (4, 4)  # the four acks still held, the requeued one gone
    connection.transport.write_held_acks()
    assert unacked(redis_client) == (0, 0)
    again = queue.get(timeout=5)  # kombu redelivers a message under its old tag
    assert again.payload == {"n": 2}
    assert again.delivery_tag == third.delivery_tag

    # A tag acked and then rejected (through the channel itself) is not written as acked
    # afterwards: that would remove the record of its redelivery.
    qos = connection.default_channel.qos
    qos.ack(again.delivery_tag)
    qos.reject(again.delivery_tag, requeue=True)
    redelivered = queue.get(timeout=5)
    assert redelivered.delivery_tag == third.delivery_tag
    connection.transport.write_held_acks()
    assert unacked(redis_client) == (1, 1)  # the redelivery's own record is still there
    queue.close()


@pytest.mark.usefixtures("acks_held_long")
def test_closing_writes_the_held_acks_and_restores_only_the_unacked(
    redis_url: str, redis_client: redis.Redis
) -> None:
    with Connection(redis_url, transport=TRANSPORT) as conn:
        queue = queue_of(conn, "held-acks-close", 5)
        taken = take(queue, 5, ack=False)
        for message in taken[:3]:
            message.ack()
        assert unacked(redis_client) == (5, 5)
    # Closed at once: the three acks were written, the two unacked went back to the queue.
    assert unacked(redis_client) == (0, 0)
    restored = [json.loads(i) for i in redis_client.lrange("held-acks-close", 0, -1)]
    assert len(restored) == 2


@pytest.mark.usefixtures("acks_held_long")
def test_a_failed_write_keeps_its_acks_for_the_next_one(
    connection: Connection, redis_client: redis.Redis
) -> None:
    queue = queue_of(connection, "held-acks-failed", 5)
    take(queue, 5)
    qos = connection.default_channel.qos

    def broker_away(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Error 111 connecting to the broker. Connection refused.")

    qos.pipe_or_acquire = broker_away
    with structlog.testing.capture_logs() as logs:
        connection.transport.write_held_acks()  # does not raise
    (failed,) = [e for e in logs if e["event"] == "transport.ack_write_failed"]
    assert (failed["held"], failed["dropped"]) == (5, 0)
    assert failed["log_level"] == "warning"
    assert unacked(redis_client) == (5, 5)
    del qos.pipe_or_acquire  # the broker is back
    connection.transport.write_held_acks()
    assert unacked(redis_client) == (0, 0)
    queue.close()


@pytest.mark.usefixtures("acks_held_long")
def test_a_failed_write_drops_acks_held_for_half_the_visibility_timeout(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Later, kombu may have restored the message and a worker taken it again under the same
    tag: the ack would remove that delivery's record. The message comes back instead."""
    options = {"visibility_timeout": 0.2}
    with Connection(redis_url, transport=TRANSPORT, transport_options=options) as conn:
        queue = queue_of(conn, "held-acks-old", 2)
        old, new = take(queue, 2, ack=False)
        old.ack()
        time.sleep(0.15)
        new.ack()
        qos = conn.default_channel.qos
        qos.pipe_or_acquire = lambda *a, **k: (_ for _ in ()).throw(redis.ConnectionError())
        with structlog.testing.capture_logs() as logs:
            conn.transport.write_held_acks()
        (failed,) = [e for e in logs if e["event"] == "transport.ack_write_failed"]
        assert (failed["held"], failed["dropped"]) == (1, 1)
        del qos.pipe_or_acquire
        conn.transport.write_held_acks()
        left = redis_client.hkeys("unacked")
        assert left == [old.delivery_tag.encode()]  # for the visibility timeout to bring back
        queue.close()


@pytest.mark.usefixtures("acks_held_long")
def test_the_worker_writes_held_acks_on_its_timer(
    connection: Connection, redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    app = create_app(settings_for(redis_url, tmp_path))
    assert AckWriting in app.steps["consumer"]
    queue = connection.SimpleQueue("held-acks-timer")
    queue.put({"n": 1})
    take(queue, 1)
    assert unacked(redis_client) == (1, 1)
    AckWriting.write(SimpleNamespace(connection=connection))  # what the timer calls
    assert unacked(redis_client) == (0, 0)
    AckWriting.write(SimpleNamespace(connection=None))  # between a lost connection and the next
    queue.close()
