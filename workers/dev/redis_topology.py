"""A replicated Redis on this machine: one master, N replicas and M Sentinels, each a real
``redis-server`` process (the Sentinels are the same binary in ``--sentinel`` mode), on free
ports under a directory the caller owns. For the failover tests and the produce benchmark.

The Sentinels notice a dead master after ``down_after_ms`` and give up on a failover attempt
after ``failover_timeout_ms``; the defaults here (1 s, 3 s) make a SIGKILLed master's
replacement take a few seconds instead of production's tens. Everything started is stopped by
``stop()`` (or leaving the ``with`` block), even when starting failed half way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast
from urllib.parse import quote

import redis
from pydantic import SecretStr

from config.redis import RedisSettings
from workers import redis_clients
from workers.dev.embedded_redis import EmbeddedRedis, redis_server_binary

LOCALHOST = "127.0.0.1"


class SentinelServer(EmbeddedRedis):
    """``redis-server <conf> --sentinel``: a Sentinel rewrites its configuration file, so it
    gets one of its own in its directory."""

    def __init__(self, data_dir: Path, config: str, password: str | None = None) -> None:
        super().__init__(data_dir, password=password)
        self.config = config

    def command(self) -> list[str]:
        conf = self.data_dir.resolve() / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind {LOCALHOST}\ndir {self.data_dir.resolve()}\n"
            f"logfile redis.log\ndaemonize no\n{self.config}"
            + (f"requirepass {self.password}\n" if self.password else "")
        )
        return [redis_server_binary(), str(conf), "--sentinel"]


@dataclass(frozen=True)
class Node:
    """A data node's address."""

    port: int
    password: str | None = None

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return plain_client(self.port, timeout, self.password)


class RedisTopology:
    """Start with ``with RedisTopology(path, replicas=2, sentinels=3) as topology:``."""

    def __init__(
        self,
        workdir: Path,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        master_name: str = "relay",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        """``password``: the data nodes' (master's and replicas'); ``sentinel_password``: the
        Sentinels' own."""
        self.workdir = Path(workdir)
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.sentinel_password = sentinel_password
        self.nodes: list[EmbeddedRedis] = []
        self.sentinels: list[SentinelServer] = []

    # --- addresses ---------------------------------------------------------------------------

    @property
    def first_master_url(self) -> str:
        """The master as started (before any failover): a plain ``redis://`` URL."""
        return self.nodes[0].url

    def sentinel_url(self, db: int = 0) -> str:
        """config/redis.py's Sentinel form: ``sentinel://[:password@]host:port,.../db``."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        hosts = ",".join(f"{LOCALHOST}:{s.port}" for s in self.sentinels)
        return f"sentinel://{auth}{hosts}/{db}"

    def redis_settings(self, db: int = 0) -> RedisSettings:
        """What a worker or producer is configured with to reach this topology's master."""
        password = SecretStr(self.sentinel_password) if self.sentinel_password else None
        return RedisSettings(url=self.sentinel_url(db), sentinel_master=self.master_name,
                             sentinel_password=password)  # fmt: skip

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        return plain_client(self.sentinels[index].port, password=self.sentinel_password)

    def master(self) -> Node:
        """The master the Sentinels name now (the first that answers)."""
        for index in range(len(self.sentinels)):
            try:
                address = self.sentinel_client(index).sentinel_get_master_addr_by_name(
                    self.master_name
                )
                return Node(int(cast(tuple[str, str], address)[1]), self.password)
            except (redis.RedisError, TypeError):
                continue
        raise RuntimeError("no Sentinel answers")

    def node(self, port: int) -> EmbeddedRedis:
        return next(n for n in self.nodes if n.port == port)

    # --- life cycle --------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> RedisTopology:
        try:
            master = EmbeddedRedis(self.workdir / "node-0", password=self.password).start()
            self.nodes.append(master)
            for index in range(1, self.replica_count + 1):
                replica = EmbeddedRedis(
                    self.workdir / f"node-{index}",
                    extra_args=["--replicaof", LOCALHOST, str(master.port)],
                    password=self.password,
                )
                self.nodes.append(replica.start())
            self.wait_replicas_in_sync(timeout)
            for index in range(self.sentinel_count):
                self.sentinels.append(
                    SentinelServer(
                        self.workdir / f"sentinel-{index}",
                        self._sentinel_config(),
                        self.sentinel_password,
                    )
                )
                self.sentinels[-1].start()
            if self.sentinels:
                self._wait_sentinels_know_everyone(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _sentinel_config(self) -> str:
        name, quorum = self.master_name, self.sentinel_count // 2 + 1
        return (
            f"sentinel monitor {name} {LOCALHOST} {self.nodes[0].port} {quorum}\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {name} {self.replica_count}\n"
            + (f"sentinel auth-pass {name} {self.password}\n" if self.password else "")
        )

    def wait_replicas_in_sync(self, timeout: float = 30.0, master: Node | None = None) -> None:
        """Until every live replica's link to ``master`` (default: the first) is up."""
        port = master.port if master else self.nodes[0].port
        replicas = [n for n in self.nodes if n.port != port and _alive(n)]
        _wait(
            lambda: all(
                Node(r.port, self.password).client().info("replication").get("master_link_status")
                == "up"
                for r in replicas
            ),
            timeout,
            "replicas never linked to the master",
        )

    def _wait_sentinels_know_everyone(self, timeout: float) -> None:
        def known() -> bool:
            for index in range(len(self.sentinels)):
                client = self.sentinel_client(index)
                replicas = cast(list[Any], client.sentinel_slaves(self.master_name))
                peers = cast(list[Any], client.sentinel_sentinels(self.master_name))
                if len(replicas) < self.replica_count or len(peers) < self.sentinel_count - 1:
                    return False
            return True

        _wait(known, timeout, "the Sentinels never found every replica and each other")

    def kill_master(self) -> Node:
        """SIGKILL the current master, as a lost machine; returns its address."""
        master = self.master()
        self.node(master.port).kill()
        return master

    def wait_promoted(self, old: Node, timeout: float = 30.0) -> Node:
        """Until the Sentinels name another master and it says it is one; returns it."""

        def promoted() -> Node | None:
            try:
                new = self.master()
                if new != old and new.client().info("replication").get("role") == "master":
                    return new
            except (redis.RedisError, RuntimeError):
                pass
            return None

        _wait(promoted, timeout, f"no replica was promoted after {old} died")
        found = promoted()
        assert found is not None
        return found

    def stop(self) -> None:
        for process in [*self.sentinels, *self.nodes]:
            process.stop()

    def __enter__(self) -> RedisTopology:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def plain_client(port: int, timeout: float = 1.0, password: str | None = None) -> redis.Redis:
    """A client of one node or Sentinel as such (not of the master a Sentinel names)."""
    auth = f":{quote(password, safe='')}@" if password else ""
    conf = RedisSettings(
        url=f"redis://{auth}{LOCALHOST}:{port}/0", socket_timeout=timeout, connect_timeout=timeout
    )
    return redis_clients.client(conf)


def _alive(node: EmbeddedRedis) -> bool:
    return node.process is not None and node.process.poll() is None


def _wait(predicate: Callable[[], object], timeout: float, failure: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{failure} within {timeout:g} s")
