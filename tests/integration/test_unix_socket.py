"""unix:// end to end: a worker process and a producer on a redis-server that listens on a
unix socket only, through our kombu transport, deliver to a real local HTTP receiver."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from config.settings import Settings
from producers.produce import Producer
from tests.conftest import WorkerProcess
from tests.helpers import INSTALL, net_destination_toml
from workers import redis_clients
from workers.dev.embedded_redis import redis_server_binary
from workers.dev.receiver import PostbackReceiver

pytestmark = pytest.mark.integration

EVENTS = 20


@pytest.fixture
def unix_url(tmp_path: Path) -> Iterator[str]:
    socket = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", str(socket), "--save", "",
         "--dir", str(tmp_path), "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"unix://{socket}?db=3"
    deadline = time.monotonic() + 15
    while not socket.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_worker_and_a_producer_on_a_unix_socket_deliver_every_event(
    unix_url: str,
    receiver: PostbackReceiver,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    destinations = tmp_path / "destinations.toml"
    destinations.write_text(net_destination_toml(receiver.url))
    worker = start_worker(destinations, env={"POSTBACK_RELAY_REDIS_URL": unix_url})
    settings = Settings(redis_url=unix_url, destinations_file=destinations)
    producer = Producer.from_settings(settings)
    for n in range(EVENTS):
        assert len(producer.produce({**INSTALL, "event_id": f"unix-{n}"}).accepted) == 1
    got = receiver.wait_for(EVENTS, timeout=60)
    assert len({r.headers["X-Idempotency-Key"] for r in got}) == EVENTS, worker.log()[-3000:]
    assert f"Connected to {redis_clients.TRANSPORT}://" in worker.log()
    client = redis_clients.client(settings.broker_redis)
    assert client.connection_pool.connection_class is redis.UnixDomainSocketConnection
    assert client.dbsize() > 0  # the deliveries' state is in database 3 of the socket's server
    client.close()
