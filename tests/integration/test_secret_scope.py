"""Secrets are read only where they are sent: a producer needs none, a worker only those of the
kinds it consumes, and refuses to start without one of them (ARCHITECTURE rule 9)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from producers.produce import Producer
from schemas.envelope import delivery_id_for
from tests.conftest import WorkerProcess
from tests.helpers import INSTALL, one_of_each_kind
from workers.dev.receiver import PostbackReceiver

pytestmark = pytest.mark.integration

API_KEY = "k3y-7c1e90a4d2"
PARTNER_SECRETS = ("PARTNER_API_KEY", "X_CONSUMER_KEY", "X_CONSUMER_SECRET", "X_ACCESS_TOKEN",
                   "X_ACCESS_TOKEN_SECRET", "X_PARTNER_KEY", "APPMETRICA_TOKEN")  # fmt: skip


def test_producer_without_partner_secrets_is_delivered_by_a_worker_that_has_them(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    redis_url: str,
    redis_client: redis.Redis,  # an empty database: the event is new
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    path = write_destinations(one_of_each_kind(receiver.url, tmp_path / "no_xmp_token"))
    # A backend service: the Redis URL and the destinations file, not one partner secret.
    monkeypatch.setenv("POSTBACK_RELAY_REDIS_URL", redis_url)
    monkeypatch.setenv("POSTBACK_RELAY_DESTINATIONS_FILE", str(path))
    for var in PARTNER_SECRETS:
        monkeypatch.delenv(var, raising=False)
    result = Producer.from_settings().produce(INSTALL)
    assert sorted(result.accepted) == sorted(
        delivery_id_for("install-1", name) for name in ("partner", "x")
    )

    # The templated worker has its partner's key, and none of X's, XMP's or AppMetrica's.
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
    tmp_path: Path,
) -> None:
    path = write_destinations(one_of_each_kind(receiver.url, tmp_path / "no_xmp_token"))
    worker = start_worker(path, "--queues", "templated", env={"PARTNER_API_KEY": ""}, ready=False)
    try:
        code = worker.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker started without PARTNER_API_KEY:\n{worker.log()[-2000:]}")
    assert code == 2
    assert "destination 'partner'" in worker.log()
    assert "PARTNER_API_KEY" in worker.log()
    assert "X_CONSUMER_KEY" not in worker.log()  # X's secrets are not this worker's concern
