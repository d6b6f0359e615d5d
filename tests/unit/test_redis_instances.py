"""Real servers on the other URL forms and roles: a unix socket and a Sentinel through the client
factory and our kombu transport; `health` and `status` naming each instance they talk to and its role
(one instance, separate broker and state, a replica, an unreachable one)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result
from kombu import Connection
from pydantic import SecretStr
from redis.sentinel import SentinelManagedConnection

from config.redis import RedisSettings
from workers import redis_clients
from workers.cli.main import main
from workers.dev.embedded_redis import free_port, redis_server_binary


def _server(workdir: Path, *args: str) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [redis_server_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--daemonize", "no", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _wait_ready(client: redis.Redis, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"redis-server exited {proc.returncode}"
        try:
            client.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise AssertionError("redis-server did not answer")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[RedisSettings]:
    socket = tmp_path / "redis.sock"
    proc = _server(tmp_path / "unix", "--port", "0", "--unixsocket", str(socket))
    conf = RedisSettings(url=f"unix://{socket}?db=2")
    client = redis_clients.client(conf)
    _wait_ready(client, proc)
    client.close()
    yield conf
    _stop(proc)


def test_a_unix_socket_serves_the_factorys_clients_and_our_transport(
    unix_redis: RedisSettings,
) -> None:
    client = redis_clients.client(unix_redis, pool_size=4)
    client.set("probe", "1")
    assert client.connection_pool.connection_class is redis.UnixDomainSocketConnection
    options = redis_clients.kombu_connection_options(unix_redis)
    with Connection(
        options["broker_url"],
        transport=options["broker_transport"],
        transport_options=options["broker_transport_options"],
    ) as conn:
        queue = conn.SimpleQueue("unix-transport")
        for n in range(5):
            queue.put({"n": n})
        got = []
        for _ in range(5):
            message = queue.get(timeout=5)
            got.append(message.payload["n"])
            message.ack()
        queue.close()
        pool = conn.default_channel.pool
        assert issubclass(pool.connection_class, redis.UnixDomainSocketConnection)
    assert got == [0, 1, 2, 3, 4]
    assert client.exists("probe")  # the same database (2) as the factory's client
    client.close()


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[RedisSettings]:
    """A master with a password and one sentinel (with its own) that names it "relay"."""
    master_port, sentinel_port = free_port(), free_port()
    master = _server(tmp_path / "master", "--port", str(master_port), "--requirepass", "dpw")
    config = tmp_path / "sentinel.conf"  # sentinel rewrites its file: one of its own
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\nrequirepass spw\n"
        f"sentinel monitor relay 127.0.0.1 {master_port} 1\nsentinel auth-pass relay dpw\n"
    )
    sentinel = subprocess.Popen(
        [redis_server_binary(), str(config), "--sentinel", "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    conf = RedisSettings(url=f"sentinel://:dpw@127.0.0.1:{sentinel_port}/1",
                         sentinel_master="relay", sentinel_password=SecretStr("spw"))  # fmt: skip
    try:
        client = redis_clients.client(conf)
        _wait_ready(client, sentinel)
        client.close()
        yield conf
    finally:
        for proc in (sentinel, master):
            _stop(proc)


def test_sentinel_serves_the_factorys_clients_our_transport_and_health(
    sentinel_redis: RedisSettings, tmp_path: Path
) -> None:
    """The seam the failover test builds on: the factory asks the sentinels for the master,
    and so does our transport's pool; health names the master it reached."""
    client = redis_clients.client(sentinel_redis, pool_size=4)
    assert redis_clients.server_role(client) == "master"
    options = redis_clients.kombu_connection_options(sentinel_redis)
    with Connection(
        options["broker_url"],
        transport=options["broker_transport"],
        transport_options=options["broker_transport_options"],
    ) as conn:
        queue = conn.SimpleQueue("sentinel-transport")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        message.ack()
        queue.close()
        assert issubclass(conn.default_channel.pool.connection_class, SentinelManagedConnection)
    assert message.payload == {"n": 1}
    env = {
        "POSTBACK_RELAY_REDIS_URL": sentinel_redis.url,
        "POSTBACK_RELAY_REDIS_SENTINEL_MASTER": "relay",
        "POSTBACK_RELAY_REDIS_SENTINEL_PASSWORD": "spw",
    }
    health = _cli(["health", "--check", "redis"], tmp_path, **env)
    assert health.output.splitlines() == [
        f"redis: broker and state (one instance): {sentinel_redis.describe()}, master",
        "ok",
    ]
    client.close()


def _cli(args: list[str], tmp_path: Path, **env: str) -> Result:
    destinations = tmp_path / "destinations.toml"
    destinations.write_text("")
    full_env = {"POSTBACK_RELAY_DESTINATIONS_FILE": str(destinations), "COLUMNS": "200", **env}
    return CliRunner().invoke(main, args, env=full_env)


def _describe(url: str) -> str:
    return RedisSettings(url=url).describe()


def test_health_and_status_name_the_one_instance_and_its_role(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    line = f"redis: broker and state (one instance): {_describe(redis_url)}, master"
    health = _cli(["health", "--check", "redis"], tmp_path, POSTBACK_RELAY_REDIS_URL=redis_url)
    assert health.exit_code == 0, health.output
    assert health.output.splitlines() == [line, "ok"]
    status = _cli(["status"], tmp_path, POSTBACK_RELAY_REDIS_URL=redis_url)
    assert status.exit_code == 0, status.output
    assert status.output.splitlines()[0] == line


def test_separate_instances_are_each_named(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    state_url = redis_url.rsplit("/", 1)[0] + "/15"
    env = {"POSTBACK_RELAY_REDIS_URL": redis_url, "POSTBACK_RELAY_STATE_REDIS_URL": state_url}
    health = _cli(["health", "--check", "redis"], tmp_path, **env)
    assert health.exit_code == 0, health.output
    assert health.output.splitlines() == [
        f"redis: broker: {_describe(redis_url)}, master",
        f"redis: state: {_describe(state_url)}, master",
        "ok",
    ]


def test_a_replica_or_an_unreachable_instance_fails_health_naming_it(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    master = redis_client.connection_pool.connection_kwargs
    port = free_port()
    proc = _server(tmp_path / "replica", "--port", str(port),
                   "--replicaof", str(master["host"]), str(master["port"]))  # fmt: skip
    replica_url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_ready(redis.Redis(port=port), proc)
        gone = f"redis://127.0.0.1:{free_port()}/0"
        env = {"POSTBACK_RELAY_REDIS_URL": replica_url, "POSTBACK_RELAY_STATE_REDIS_URL": gone}
        health = _cli(["health", "--check", "redis"], tmp_path, **env)
        status = _cli(["status"], tmp_path, **env)
    finally:
        _stop(proc)
    assert health.exit_code == 1, health.output
    lines = health.output.splitlines()
    assert lines[0] == f"redis: broker: {_describe(replica_url)}, replica"
    assert lines[1] == f"FAIL redis: broker: {_describe(replica_url)} is a replica, not a master"
    assert lines[2].startswith(f"FAIL redis: state: unreachable at {_describe(gone)} (Error 111")
    assert status.exit_code == 1
    assert status.output.splitlines()[:2] == lines[:2]
