"""Our kombu transport: one redis-py client per channel instead of one per publish or ack."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from kombu import Connection

from workers.app import TRANSPORT


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
        # Acked: nothing is left in kombu's unacked hash to be restored later.
        client = connection.default_channel.client
        assert client.hlen(connection.default_channel.unacked_key) == 0
    finally:
        queue.clear()
        queue.close()
