"""Secrets are read only where they are sent: a producer needs none, a worker only those of the
kinds it consumes, and refuses to start without one of them (ARCHITECTURE rule 9)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from producers.produce import Producer
from schemas.envelope import delivery_id_for
from tests.conftest import WorkerProcess
from workers.sandbox.receiver import PostbackReceiver

pytestmark = pytest.mark.integration

API_KEY = "k3y-7c1e90a4d2"
X_VARS = ("X_CONSUMER_KEY", "X_CONSUMER_SECRET", "X_ACCESS_TOKEN", "X_ACCESS_TOKEN_SECRET",
          "X_PARTNER_KEY")  # fmt: skip


def destinations(base: str) -> str:
    """X first: the file's order must not decide which secrets a worker asks for."""
    return f"""
[[destination]]
name = "x"
kind = "x_mact"
base_url = "{base}"
[destination.credentials]
consumer_key = {{ env = "X_CONSUMER_KEY" }}
consumer_secret = {{ env = "X_CONSUMER_SECRET" }}
access_token = {{ env = "X_ACCESS_TOKEN" }}
access_token_secret = {{ env = "X_ACCESS_TOKEN_SECRET" }}
partner_key = {{ env = "X_PARTNER_KEY" }}
[[destination.routes]]
type = "install"

[[destination]]
name = "partner"
kind = "templated"
url = "{base}/pb?idfa=(idfa)&key={{credential:api_key}}"
headers = {{ X-Api-Key = "{{credential:api_key}}" }}
credentials = {{ api_key = {{ env = "PARTNER_API_KEY" }} }}
[[destination.routes]]
type = "install"
"""


INSTALL = {
    "event_id": "install-1",
    "app_id": "123456789",
    "platform": "ios",
    "event_name": "install",
    "event_time": "2026-11-22T10:00:00Z",
    "idfa": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
}


def test_producer_without_partner_secrets_is_delivered_by_a_worker_that_has_them(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    redis_url: str,
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_destinations(destinations(receiver.url))
    # A backend service: the Redis URL and the destinations file, not one partner secret.
    monkeypatch.setenv("POSTBACK_RELAY_REDIS_URL", redis_url)
    monkeypatch.setenv("POSTBACK_RELAY_DESTINATIONS_FILE", str(path))
    for var in ("PARTNER_API_KEY", *X_VARS):
        monkeypatch.delenv(var, raising=False)
    result = Producer.from_settings().produce(INSTALL)
    assert sorted(result.accepted) == sorted(
        delivery_id_for("install-1", name) for name in ("partner", "x")
    )

    # The templated worker has its partner's key and none of X's: it starts and sends.
    worker = start_worker(path, "--queues", "templated", env={"PARTNER_API_KEY": API_KEY})
    (got,) = receiver.wait_for(1, timeout=20)
    assert got.path == "/pb"
    assert dict(got.query)["key"] == API_KEY, worker.log()[-2000:]
    assert got.headers["X-Api-Key"] == API_KEY
    assert API_KEY not in worker.log()


def test_worker_without_a_secret_of_its_kinds_refuses_to_start(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    path = write_destinations(destinations(receiver.url))
    worker = start_worker(path, "--queues", "templated", env={"PARTNER_API_KEY": ""}, ready=False)
    try:
        code = worker.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker started without PARTNER_API_KEY:\n{worker.log()[-2000:]}")
    assert code == 2
    assert "destination 'partner'" in worker.log()
    assert "PARTNER_API_KEY" in worker.log()
    assert "X_CONSUMER_KEY" not in worker.log()  # X's secrets are not this worker's concern
