"""Worker pools and task events: gevent delivers like threads, and task events (for Flower) and
acks are written in batches with either pool."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producers.produce import Producer
from tests.conftest import WorkerProcess
from tests.helpers import cli_env, run_cli, wait_until
from workers.dev.receiver import PostbackReceiver

pytestmark = pytest.mark.integration

N = 30


def installs(run: str) -> list[dict[str, Any]]:
    return [
        {"event_id": f"{run}-{i}", "app_id": "id1", "platform": "ios", "event_name": "install",
         "event_time": "2026-11-22T10:00:00Z", "idfa": f"6D92078A-8246-4BA4-AE5B-{i:012d}"}
        for i in range(N)
    ]  # fmt: skip


def task_events(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The Celery events in one pub/sub message of kombu's Redis fanout (one or a batch)."""
    envelope = json.loads(message["data"])
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    events = json.loads(body)
    return [e for e in (events if isinstance(events, list) else [events])
            if e["type"].startswith("task-")]  # fmt: skip


@pytest.mark.parametrize("pool", ["threads", "gevent"])
def test_every_delivery_arrives_and_task_events_go_out_in_batches(
    pool: str,
    net_destination: Path,
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    start_worker: Callable[..., WorkerProcess],
    make_producer: Callable[[Path], Producer],
) -> None:
    events_channel = redis_client.pubsub(ignore_subscribe_messages=True)
    events_channel.psubscribe("*celeryev*")
    worker = start_worker(
        net_destination, "--queues", "templated", "--pool", pool, "--concurrency", "8"
    )
    banner = {"threads": "concurrency: 8 (thread)", "gevent": "concurrency: 8 (gevent)"}
    assert banner[pool] in worker.log()
    results = make_producer(net_destination).produce_many(installs(pool))
    accepted = [delivery_id for result in results for delivery_id in result.accepted]
    assert len(accepted) == N

    got = receiver.wait_for(N, timeout=60)
    assert sorted(r.headers["X-Idempotency-Key"] for r in got) == sorted(accepted)

    seen: dict[str, set[str]] = defaultdict(set)
    publishes = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        len(seen) < N or any(len(types) < 3 for types in seen.values())
    ):
        message = events_channel.get_message(timeout=1.0)
        if message is None:
            continue
        batch = task_events(message)
        publishes += bool(batch)
        for event in batch:
            seen[event["uuid"].rsplit(".", 1)[0]].add(event["type"])
    events_channel.close()

    assert set(seen) == set(accepted)
    assert all(
        types == {"task-received", "task-started", "task-succeeded"} for types in seen.values()
    )
    # 3 events per delivery; one publish each would be 3 * N.
    assert publishes <= N // 2, f"{publishes} publishes for {3 * N} task events"
    # Fewer acks than a batch (workers/broker/transport.py): the consumer's timer writes them
    # while the worker runs, whatever the pool.
    assert wait_until(lambda: redis_client.hlen("unacked") == 0, 5), "acks left held"
    assert worker.proc.poll() is None


def test_gevent_workers_patch_first_keep_their_node_name_and_health_counts_each(
    redis_url: str, net_destination: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    # Two workers under one node name, as every worker on a host was before names were unique
    # (and as an explicit -n still allows): health must count both, not the last reply.
    workers = [
        start_worker(net_destination, "--queues", kind, "--pool", "gevent", "--concurrency", "4",
                     "-n", "twin@%h", ready=False)
        for kind in ("templated", "xmp")
    ]  # fmt: skip
    host = socket.gethostname()
    for worker in workers:
        worker.wait_ready()
        # Same PID, re-executed through the module that patches first, with the name given.
        cmdline = Path(f"/proc/{worker.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"workers.gevent_worker" in cmdline
        assert cmdline[cmdline.index(b"-n") + 1] == b"twin@%h"
        assert "MonkeyPatchWarning" not in worker.log()
        assert f"twin@{host} ready." in worker.log()

    result = run_cli(
        cli_env(redis_url, net_destination),
        "health", "--check", "consumers", "--queue", "templated", "--queue", "xmp",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"consumers: postback.templated: twin@{host}\n" in result.stdout
    assert f"consumers: postback.xmp: twin@{host}\n" in result.stdout
    assert f"WARN consumers: 2 workers answer as twin@{host};" in result.stdout
