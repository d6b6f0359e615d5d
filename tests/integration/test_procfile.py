"""The Procfile's own processes on one host, started by honcho as an operator would (two of the
templated worker, to show that workers on the same queues stay apart too): each worker is its own
Celery node for `health`, Flower and `celery inspect`; Flower shows deliveries without personal
data and only with credentials; metrics are served. Everything honcho started is gone after."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from config.keys import queue_for
from config.kinds import KINDS
from tests.helpers import ROOT, cli_env, net_destination_toml, run_cli, wait_until
from workers.dev.embedded_redis import free_port
from workers.dev.receiver import PostbackReceiver

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
# Every process honcho starts inherits this variable, so whatever is left after honcho stops can
# be found even if it left honcho's process tree.
MARKER = "POSTBACK_RELAY_TEST_PROCFILE"
TWO_TEMPLATED = "worker-templated=2"


@dataclass
class OneHost:
    env: dict[str, str]
    flower: str
    metrics: str
    api: str
    receiver: PostbackReceiver
    log: Path
    auth: tuple[str, str] = ("ops", "s3cret-flower")
    workers: dict[str, Any] = field(default_factory=dict)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.flower + path, auth=self.auth, timeout=10, **kwargs)

    def wait_for_workers(self, count: int, timeout: float = 90) -> dict[str, Any]:
        """Flower's /api/workers once `count` workers report their queues."""
        if sum(bool(w.get("active_queues")) for w in self.workers.values()) >= count:
            return self.workers

        def listed() -> bool:
            try:
                self.workers = self.get("/api/workers?refresh=1").json()
            except (requests.RequestException, ValueError):
                return False
            return sum(bool(w.get("active_queues")) for w in self.workers.values()) >= count

        assert wait_until(listed, timeout, interval=0.5), self.log.read_text(errors="replace")
        return self.workers


def _left_over(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries the marker."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{MARKER}={marker}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return found


@pytest.fixture(scope="module")
def one_host(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneHost]:
    tmp = tmp_path_factory.mktemp("procfile")
    marker = uuid.uuid4().hex
    with PostbackReceiver() as receiver:
        destinations = tmp / "destinations.toml"
        destinations.write_text(net_destination_toml(receiver.url))
        web_port, metrics_port, api_port = free_port(), free_port(), free_port()
        env = cli_env(
            redis_url, destinations,
            PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",  # `postback-relay` as installed
            POSTBACK_RELAY_FLOWER_USER="ops", POSTBACK_RELAY_FLOWER_PASSWORD="s3cret-flower",
            POSTBACK_RELAY_METRICS_PORT=str(metrics_port),
            POSTBACK_RELAY_API_PORT=str(api_port),  # no clients file: it refuses requests
            POSTBACK_RELAY_DATA_DIR=str(tmp / "data"),
            **{MARKER: marker},
        )  # fmt: skip
        (tmp / ".env").write_text("")  # not a developer's .env from the working directory
        log = tmp / "honcho.log"
        with log.open("wb") as out:
            honcho = subprocess.Popen(
                [str(BIN / "honcho"), "--no-colour", "-e", str(tmp / ".env"),
                 "-f", str(ROOT / "Procfile"), "start", "-p", str(web_port), "-c", TWO_TEMPLATED],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            # `web` is the Procfile's first process, so honcho gives it the base port as $PORT.
            yield OneHost(
                env, f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{metrics_port}/metrics",
                f"http://127.0.0.1:{api_port}", receiver, log,
            )  # fmt: skip
        finally:
            # What an operator's Ctrl-C does: honcho sends SIGTERM to each process group and
            # SIGKILL to what is still there 5 s later.
            honcho.send_signal(signal.SIGINT)
            try:
                honcho.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(honcho.pid, signal.SIGKILL)
                honcho.wait(5)
            left = _left_over(marker)
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            assert not left, f"still running after honcho stopped: {left}"


def _worker_kinds(workers: dict[str, Any]) -> dict[str, list[str]]:
    """Node name -> the kinds of the queues it consumes."""
    return {
        name: [q["name"].removeprefix("postback.") for q in info.get("active_queues") or []]
        for name, info in workers.items()
    }


def test_each_worker_is_its_own_node_in_flower_and_health_passes(one_host: OneHost) -> None:
    workers = _worker_kinds(one_host.wait_for_workers(len(KINDS) + 1))
    host = socket.gethostname()
    assert len(workers) == len(KINDS) + 1, workers
    for name, kinds in workers.items():
        (kind,) = kinds
        assert name.startswith(f"{kind}-"), name
        assert name.endswith(f"@{host}"), name
    assert sorted(k for kinds in workers.values() for k in kinds) == sorted([*KINDS, "templated"])

    result = run_cli(one_host.env, "health")
    assert result.returncode == 0, result.stdout + result.stderr
    queues = [arg for kind in KINDS for arg in ("--queue", kind)]
    result = run_cli(one_host.env, "health", "--check", "consumers", *queues)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN" not in result.stdout
    for name, (kind,) in workers.items():
        line = next(ln for ln in result.stdout.splitlines() if queue_for(kind) + ":" in ln)
        assert name in line


def test_celery_inspect_by_habit_lists_each_worker_and_its_queue(one_host: OneHost) -> None:
    workers = _worker_kinds(one_host.wait_for_workers(len(KINDS) + 1))
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app", "inspect", "active_queues"],
        env=one_host.env, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(workers)} nodes online" in result.stdout
    for name, (kind,) in workers.items():
        block = result.stdout.split(f"{name}: OK", 1)[1].split("->", 1)[0]
        assert f"'name': '{queue_for(kind)}'" in block
    # stats carries the broker's transport options, JSON-encoded: every worker must answer it
    # (Flower asks for it; a value that is not JSON made every reply fail).
    stats = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app", "inspect", "stats", "--json"],
        env=one_host.env, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert stats.returncode == 0, stats.stdout + stats.stderr
    replies = json.loads(stats.stdout)
    assert set(replies) == set(workers), stats.stdout
    for reply in replies.values():
        options = reply["broker"]["transport_options"]
        assert options["on_unreadable_item"] == "the dead-letter store"


def test_a_delivery_shows_in_flower_without_personal_data(one_host: OneHost) -> None:
    event = (
        '{"event_id": "procfile-1", "app_id": "id1", "platform": "ios", "event_name": "install",'
        f' "event_time": "2026-11-22T10:00:00Z", "idfa": "{IDFA}", "ip": "203.0.113.7"}}'
    )
    produced = run_cli(one_host.env, "produce", stdin=event)
    assert produced.returncode == 0, produced.stdout + produced.stderr
    (delivery_id,) = json.loads(produced.stdout)["accepted"]
    one_host.receiver.wait_for(1, timeout=30)
    task: dict[str, Any] = {}

    def succeeded() -> bool:
        nonlocal task
        task = one_host.get("/api/tasks").json().get(delivery_id, {})
        return task.get("state") == "SUCCESS"

    assert wait_until(succeeded, 30, interval=0.5), task
    assert task["name"] == "postback_relay.deliver_templated"
    assert task["worker"].startswith("templated-")
    assert delivery_id in task["args"]
    assert "'destination': 'net'" in task["args"]
    assert IDFA not in str(task)
    assert "203.0.113.7" not in str(task)
    assert task["result"].startswith("'delivered")


def test_flower_refuses_requests_without_credentials(one_host: OneHost) -> None:
    one_host.wait_for_workers(1)
    assert requests.get(one_host.flower + "/api/workers", timeout=10).status_code == 401
    wrong = requests.get(one_host.flower + "/api/workers", auth=("ops", "nope"), timeout=10)
    assert wrong.status_code == 401


def test_the_metrics_process_serves_prometheus_text(one_host: OneHost) -> None:
    one_host.wait_for_workers(1)
    response = requests.get(one_host.metrics, timeout=10)
    assert response.status_code == 200
    assert f'postback_relay_queue_depth{{queue="{queue_for("templated")}"}}' in response.text


def test_the_api_process_is_ready_and_refuses_requests_without_a_client(one_host: OneHost) -> None:
    one_host.wait_for_workers(1)

    def ready() -> bool:
        try:
            return requests.get(one_host.api + "/readyz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    assert wait_until(ready, 60, interval=0.5), one_host.log.read_text(errors="replace")
    refused = requests.post(one_host.api + "/v1/events", json={}, timeout=10)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == "Bearer"
