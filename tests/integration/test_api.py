"""`postback-relay api` as a real process on a free port, with a real Redis and, where events
must arrive, a real worker and partner: what it accepts is delivered, a replay enqueues nothing,
each bad request gets its status with nothing enqueued, Redis killed mid-request is a 503 with
nothing half-written (the client's retry then enqueues it once), and SIGTERM lets a request in
flight finish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from openapi_spec_validator import validate

from config.keys import RedisKeys
from tests.conftest import WorkerProcess
from tests.helpers import ROOT, cli_env, run_cli, wait_until
from workers.dev.embedded_redis import EmbeddedRedis, free_port
from workers.dev.receiver import PostbackReceiver

pytestmark = pytest.mark.integration

QUEUE = "postback.templated"
TOKEN = "go-backend-t0ken-0123456789"
IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
LEDGER = RedisKeys("pr").ledger()
CLIENTS = """
[[client]]
name = "go"
token = { env = "TEST_API_TOKEN" }
app_ids = ["id123456789"]
"""


def event(event_id: str, app_id: str = "id123456789", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": event_id, "app_id": app_id, "platform": "ios", "event_name": "install",
        "event_time": "2026-11-22T10:00:00Z", "idfa": IDFA, **extra,
    }  # fmt: skip


class ApiProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.session = requests.Session()  # keep-alive, as a backend's client
        self.session.headers["Authorization"] = f"Bearer {TOKEN}"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli.main", "api",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            )  # fmt: skip
        assert wait_until(self._up, 30, interval=0.1), self.log()

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.log()
        try:
            return requests.get(self.url + "/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def post(self, body: Any, **kwargs: Any) -> requests.Response:
        if isinstance(body, bytes):
            kwargs["data"] = body
        else:
            kwargs["json"] = body
        return self.session.post(self.url + "/v1/events", timeout=60, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)


@pytest.fixture
def start_api(tmp_path: Path, net_destination: Path) -> Iterator[Callable[..., ApiProcess]]:
    started: list[ApiProcess] = []
    clients = tmp_path / "clients.toml"
    clients.write_text(CLIENTS)

    def start(redis_url: str, **extra: str) -> ApiProcess:
        env = cli_env(
            redis_url, net_destination, POSTBACK_RELAY_API_CLIENTS_FILE=str(clients),
            TEST_API_TOKEN=TOKEN, **extra,
        )  # fmt: skip
        api = ApiProcess(env, tmp_path / f"api-{len(started)}.log")
        started.append(api)
        return api

    yield start
    for api in started:
        api.stop()


def enqueued(client: redis.Redis) -> tuple[int, int]:
    """(messages on the queue, deliveries in the ledger)."""
    return client.llen(QUEUE), client.zcard(LEDGER)


def test_accepted_events_are_delivered_and_a_replay_enqueues_nothing_new(
    redis_url: str,
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    net_destination: Path,
    start_api: Callable[..., ApiProcess],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    api = start_api(redis_url)
    batch = [event(f"api-{i}") for i in range(20)]
    first = api.post(batch)
    assert first.status_code == 202, first.text
    ids = {d for r in first.json()["results"] for d in r["delivery_ids"]}
    assert len(ids) == 20
    single = api.post(event("api-single"))
    assert single.status_code == 202
    start_worker(net_destination)
    receiver.wait_for(21, timeout=60)
    assert wait_until(lambda: enqueued(redis_client) == (0, 0), 30)

    replay = api.post(batch)
    assert replay.status_code == 202
    assert {r["status"] for r in replay.json()["results"]} == {"duplicate"}
    assert {d for r in replay.json()["results"] for d in r["duplicates"]} == ids
    assert enqueued(redis_client) == (0, 0)
    time.sleep(1)  # a worker would have had time to send anything enqueued
    assert len(receiver.received()) == 21
    assert TOKEN not in api.log()
    assert IDFA not in api.log()


def test_each_bad_request_gets_its_status_and_enqueues_nothing(
    redis_url: str, redis_client: redis.Redis, start_api: Callable[..., ApiProcess]
) -> None:
    api = start_api(redis_url, POSTBACK_RELAY_API_MAX_BODY_BYTES="65536")
    answers = {
        "malformed JSON": api.post(b'{"app_id": '),
        "wrong types": api.post([event("t-1", platform=7, event_time="yesterday"), "x"]),
        "oversized": api.post([event(f"o-{i}", user_agent="u" * 1000) for i in range(80)]),
        "too many": api.post([event(f"m-{i}") for i in range(501)]),
        "no token": api.post(event("n-1"), headers={"Authorization": ""}),
        "wrong token": api.post(event("w-1"), headers={"Authorization": "Bearer " + "w" * 26}),
        "another app": api.post([event("a-1"), event("a-2", app_id="id999")]),
    }
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {
        "malformed JSON": 400, "wrong types": 422, "oversized": 413, "too many": 413,
        "no token": 401, "wrong token": 403, "another app": 403,
    }  # fmt: skip
    wrong = answers["wrong types"].json()["results"]
    assert wrong[0]["error"].startswith("invalid event: platform: Input should be 'ios' or")
    assert "event_time: " in wrong[0]["error"]
    assert wrong[1]["error"] == "invalid event: expected a dict, got str"
    assert enqueued(redis_client) == (0, 0)
    document = api.session.get(api.url + "/openapi.json", timeout=10).json()
    validate(document)
    assert "/v1/events" in document["paths"]


def test_redis_killed_mid_request_is_503_with_nothing_half_enqueued(
    tmp_path: Path, start_api: Callable[..., ApiProcess]
) -> None:
    server = EmbeddedRedis(tmp_path / "r").start()
    servers = [server]
    try:
        api = start_api(server.url, POSTBACK_RELAY_REDIS_SOCKET_TIMEOUT="3")
        assert api.post(event("warm-up")).status_code == 202  # connections open, scripts loaded
        batch = [event(f"kill-{i}") for i in range(200)]
        answers: list[requests.Response] = []
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)  # the request reaches Redis, which hangs
        sender = threading.Thread(target=lambda: answers.append(api.post(batch)))
        sender.start()
        time.sleep(1.0)
        server.kill()  # SIGKILL, with the batch's script unread on its socket
        sender.join(60)
        (answer,) = answers
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "1"
        assert api.session.get(api.url + "/readyz", timeout=30).status_code == 503

        servers.append(EmbeddedRedis(tmp_path / "r", port=server.port).start())
        client = redis.Redis.from_url(server.url)
        assert enqueued(client) == (1, 1)  # the warm-up alone: nothing of the batch
        assert not any(client.scan_iter(match="*kill-*"))
        retry = api.post(batch)  # the client's retry, the same event ids
        assert retry.status_code == 202, retry.text
        assert retry.json()["accepted"] == 200
        assert enqueued(client) == (201, 201)
        client.close()
    finally:
        for each in servers:
            each.stop()


def test_sigterm_lets_the_request_in_flight_finish(
    tmp_path: Path, start_api: Callable[..., ApiProcess]
) -> None:
    with EmbeddedRedis(tmp_path / "r") as server:
        api = start_api(server.url)
        assert api.post(event("warm-up")).status_code == 202
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        answers: list[requests.Response] = []
        sender = threading.Thread(target=lambda: answers.append(api.post(event("in-flight"))))
        sender.start()
        time.sleep(2.0)  # the request is in the API, waiting on the stopped Redis
        os.killpg(api.proc.pid, signal.SIGTERM)
        time.sleep(1.0)
        assert api.proc.poll() is None, "it waits for the request in flight"
        os.kill(server.process.pid, signal.SIGCONT)
        sender.join(30)
        assert [a.status_code for a in answers] == [202]
        # uvicorn shuts down (requests in flight, then the app's shutdown), then lets the signal
        # end the process as it would have without its handler.
        assert api.proc.wait(30) == -signal.SIGTERM
        assert '"event": "api.stopped"' in api.log()
        client = redis.Redis.from_url(server.url)
        assert enqueued(client) == (2, 2)
        client.close()


def test_a_client_token_that_cannot_be_read_stops_the_api_at_start_up(
    redis_url: str, net_destination: Path, tmp_path: Path
) -> None:
    clients = tmp_path / "clients.toml"
    clients.write_text(CLIENTS)
    env = cli_env(redis_url, net_destination, POSTBACK_RELAY_API_CLIENTS_FILE=str(clients))
    env.pop("TEST_API_TOKEN", None)
    result = run_cli(env, "api", "--port", str(free_port()))
    assert result.returncode == 2
    assert "client 'go': token: environment variable TEST_API_TOKEN is not set" in result.stderr
