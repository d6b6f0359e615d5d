"""Flower against the app: basic auth, the worker and its queue listed, task args without PII."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from producers.produce import Producer
from tests.conftest import ROOT, WorkerProcess
from workers.embedded_redis import free_port
from workers.sandbox.receiver import PostbackReceiver

pytestmark = pytest.mark.integration

IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"


@pytest.fixture
def flower(redis_url: str, net_destination: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    env = {**os.environ, "POSTBACK_RELAY_REDIS_URL": redis_url,
           "POSTBACK_RELAY_DESTINATIONS_FILE": str(net_destination),
           "POSTBACK_RELAY_FLOWER_USER": "ops", "POSTBACK_RELAY_FLOWER_PASSWORD": "s3cret-flower"}  # fmt: skip
    with (tmp_path / "flower.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "flower", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
    yield {"base": f"http://127.0.0.1:{port}", "auth": ("ops", "s3cret-flower")}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(15)


def _get(flower: dict[str, Any], path: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = requests.get(flower["base"] + path, auth=flower["auth"], timeout=10)
            if response.ok:
                return response.json()
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"Flower did not answer {path}")


def test_flower_lists_the_worker_its_queue_and_readable_tasks_without_personal_data(
    flower: dict[str, Any],
    net_destination: Path,
    start_worker: Callable[..., WorkerProcess],
    make_producer: Callable[[Path], Producer],
    receiver: PostbackReceiver,
) -> None:
    start_worker(net_destination, "--queues", "templated", "--hostname", "flowertest@%h")
    deadline = time.monotonic() + 60
    workers: dict[str, Any] = {}
    while time.monotonic() < deadline:
        workers = _get(flower, "/api/workers?refresh=1")
        name = next((n for n in workers if n.startswith("flowertest@")), None)
        if name and workers[name].get("active_queues"):
            break
        time.sleep(1)
    name = next(n for n in workers if n.startswith("flowertest@"))
    assert [q["name"] for q in workers[name]["active_queues"]] == ["postback.templated"]

    (delivery_id,) = make_producer(net_destination).produce(
        {"event_id": "f1", "app_id": "id1", "platform": "ios", "event_name": "install",
         "event_time": "2026-11-22T10:00:00Z", "idfa": IDFA, "ip": "203.0.113.7"}
    ).accepted  # fmt: skip
    receiver.wait_for(1, timeout=30)
    deadline = time.monotonic() + 30
    task: dict[str, Any] = {}
    while time.monotonic() < deadline and task.get("state") != "SUCCESS":
        task = _get(flower, "/api/tasks").get(delivery_id, {})
        time.sleep(0.5)
    assert task["name"] == "postback_relay.deliver_templated"
    assert delivery_id in task["args"]
    assert "'destination': 'net'" in task["args"]
    assert IDFA not in str(task)
    assert "203.0.113.7" not in str(task)
    assert task["result"].startswith("'delivered")


def test_flower_refuses_requests_without_credentials(flower: dict[str, Any]) -> None:
    _get(flower, "/api/workers")  # up
    assert requests.get(flower["base"] + "/api/workers", timeout=10).status_code == 401
    wrong = requests.get(flower["base"] + "/api/workers", auth=("ops", "nope"), timeout=10)
    assert wrong.status_code == 401


def test_flower_will_not_start_open_without_credentials(
    redis_url: str, net_destination: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_RELAY_FLOWER")}
    env.update(POSTBACK_RELAY_REDIS_URL=redis_url,
               POSTBACK_RELAY_DESTINATIONS_FILE=str(net_destination))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "flower", "--address", "0.0.0.0"],
        env=env, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Flower needs credentials" in result.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_headless_chromium_sees_the_worker_on_the_workers_page(tmp_path: Path) -> None:
    shot = tmp_path / "workers.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "flower_check.py"), "--screenshot", str(shot)],
        capture_output=True, text=True, timeout=240, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is on the workers page" in result.stdout
    assert shot.stat().st_size > 10_000
