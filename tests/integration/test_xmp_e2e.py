"""XMP end to end: produce_many() -> Redis -> a real worker on the xmp queue (aggregates) ->
`postback-relay xmp flush [--dry-run]` (a real CLI process) -> an in-process SandboxXmp,
asserted exactly: record count, per-record totals to the micro, the batch id in the attempt log,
no token in any output; and the worker's flush task (what beat publishes) with XMP down leaves
the records dirty for its next run."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from config.keys import RedisKeys, queue_for
from config.kinds.xmp import XmpDestination
from producers.produce import Producer
from schemas.envelope import delivery_id_for
from schemas.event import ConversionEvent
from tests import helpers
from tests.conftest import WorkerProcess
from workers.broker.wire import TaskMessageEncoder
from workers.kinds.xmp.aggregate import record_key_for
from workers.kinds.xmp.sandbox import SandboxXmp
from workers.kinds.xmp.tasks import XMP_FLUSH_TASK
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore

pytestmark = pytest.mark.integration


KEYS = RedisKeys("pr")
TOKEN = "xmp-e2e-token-7c41d09b3f"
CLI = Path(sys.executable).parent / "postback-relay"
QUEUE = queue_for("xmp")


def destinations_toml(url: str) -> str:
    return f"""
[[destination]]
name = "xmp"
kind = "xmp"
url = "{url}"
timezone = "UTC+8"
credentials = {{ xmp_token = {{ env = "XMP_TOKEN" }} }}
[[destination.routes]]
type = "install"
[[destination.routes]]
type = "event"
"""


@pytest.fixture
def sandbox() -> Iterator[SandboxXmp]:
    with SandboxXmp(token=TOKEN) as server:
        yield server


@pytest.fixture
def xmp_setup(
    sandbox: SandboxXmp,
    write_destinations: Callable[[str], Path],
    make_producer: Callable[[Path], Producer],
    start_worker: Callable[..., WorkerProcess],
) -> tuple[Path, Producer, WorkerProcess]:
    path = write_destinations(destinations_toml(sandbox.url))
    producer = make_producer(path)
    worker = start_worker(path, "--queues", "xmp", "--concurrency", "4", env={"XMP_TOKEN": TOKEN})
    return path, producer, worker


def run_cli(redis_url: str, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return helpers.run_cli(helpers.cli_env(redis_url, path, XMP_TOKEN=TOKEN), *args)


def counter(client: redis.Redis, outcome: str) -> int:
    raw = client.hget(KEYS.metrics_counters(), f"xmp|{outcome}")
    return int(raw) if raw else 0


def wait_until(check: Callable[[], bool], timeout: float, what: str, worker: WorkerProcess) -> None:
    """Poll ``check``; fail at once if the worker logs a crashed task or a traceback."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        log = worker.log()
        if "raised unexpected" in log or "Traceback (most recent call last)" in log:
            raise AssertionError(
                f"a delivery task crashed while waiting for {what}:\n{log[-3000:]}"
            )
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{worker.log()[-3000:]}")


def make_events(now: datetime, rng: random.Random) -> list[dict[str, Any]]:
    """40 installs and 440 in-app events over a few record keys, all inside the 90 days."""
    devices = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(150)]
    events: list[dict[str, Any]] = []
    for number in range(40):
        events.append(
            {
                "event_id": f"inst-{number}",
                "app_id": "com.example.game",
                "platform": "android",
                "event_name": "install",
                "event_time": (now - timedelta(hours=3, minutes=number)).isoformat(),
                "gaid": devices[number],
                "media_source": "applovin_int",
                "campaign_id": "c-1",
                "adset_id": "as-1",
                "ad_id": "ad-1",
                "country": "US",
            }
        )
    for number in range(440):
        name = rng.choice(["af_purchase", "af_level_achieved"])
        installed = now - timedelta(days=rng.choice([2, 5]), hours=1)
        event: dict[str, Any] = {
            "event_id": f"ev-{number}",
            "app_id": "com.example.game",
            "platform": "android",
            "event_name": name,
            "event_time": (now - timedelta(hours=2)).isoformat(),
            "install_time": installed.isoformat(),
            "gaid": rng.choice(devices),
            "media_source": rng.choice(["applovin_int", "tiktok"]),
            "campaign_id": rng.choice(["c-1", "c-2"]),
            "adset_id": "as-1",
            "ad_id": "ad-1",
            "country": rng.choice(["US", "DE"]),
        }
        if name == "af_purchase":
            amount = Decimal(rng.randint(1, 99_999_999)).scaleb(-6)
            event["revenue_usd"] = format(amount, "f")
        events.append(event)
    return events


@pytest.mark.timeout(120)
def test_events_are_aggregated_by_a_worker_and_flushed_by_the_cli_exactly(
    xmp_setup: tuple[Path, Producer, WorkerProcess],
    sandbox: SandboxXmp,
    redis_client: redis.Redis,
    redis_url: str,
) -> None:
    path, producer, worker = xmp_setup
    dest = producer.destinations.get("xmp")
    assert isinstance(dest, XmpDestination)
    now = datetime.now(UTC)
    rng = random.Random(4242)
    events = make_events(now, rng)
    duplicates = [dict(e) for e in rng.sample(events, 20)]  # the same event_id, produced again

    # what XMP should end up with, computed here from the events themselves
    count: dict[str, int] = defaultdict(int)
    revenue: dict[str, Decimal] = defaultdict(Decimal)
    users: dict[str, set[str]] = defaultdict(set)
    for raw in events:
        parsed = ConversionEvent.parse(raw)
        rid = record_key_for(dest, parsed, now).request_id
        count[rid] += 1
        revenue[rid] += parsed.revenue_usd or Decimal(0)
        users[rid].add(raw["gaid"])
    keys = len(count)
    assert 10 <= keys <= 40

    results = producer.produce_many(events + duplicates)
    assert len(results) == 500
    assert all(r.ok for r in results)
    assert sum(len(r.accepted) for r in results) == 480
    assert sum(len(r.duplicates) for r in results) == 20

    def aggregated() -> bool:
        return counter(redis_client, "aggregated") == 480 and redis_client.llen(QUEUE) == 0

    wait_until(aggregated, 60, "480 aggregated deliveries", worker)

    # At-least-once: the broker hands over five deliveries a second time; the worker must not
    # count them again.
    encoder = TaskMessageEncoder(Celery("postback_relay", set_as_current=False))
    for raw in events[100:105]:
        parsed = ConversionEvent.parse(raw)
        route = dest.route_for(parsed)
        assert route is not None
        envelope = producer.envelope_for(parsed, dest, route, now)
        redis_client.lpush(QUEUE, encoder.encode_envelope(envelope, task_id=str(uuid.uuid4())))
    wait_until(
        lambda: counter(redis_client, "skipped") == 5 and redis_client.llen(QUEUE) == 0,
        30,
        "5 redelivered duplicates skipped",
        worker,
    )
    assert counter(redis_client, "aggregated") == 480
    assert counter(redis_client, "dead_lettered") == 0
    dirty = {m.decode() for m in redis_client.zrange(KEYS.xmp_dirty("xmp"), 0, -1)}  # type: ignore[union-attr]
    assert dirty == set(count)

    # --dry-run: prints the records, sends nothing, changes nothing
    dry = run_cli(redis_url, path, "xmp", "flush", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"xmp: {keys} record(s) would be sent" in dry.stdout
    assert f"-- request 1: {keys} record(s)" in dry.stdout
    printed = [json.loads(line, parse_float=Decimal) for line in dry.stdout.splitlines()
               if line.startswith("{") and '"request_id"' in line]  # fmt: skip
    assert len(printed) == keys
    assert {p["request_id"]: p["event_count"] for p in printed} == dict(count)
    assert {p["request_id"]: p["event_revenue_usd"] for p in printed} == dict(revenue)
    assert all("xmp_token" not in p for p in printed)
    assert sandbox.requests == []
    assert sandbox.totals == {}
    assert redis_client.zcard(KEYS.xmp_dirty("xmp")) == keys

    # the real flush
    flushed = run_cli(redis_url, path, "xmp", "flush")
    assert flushed.returncode == 0, flushed.stderr
    assert f"xmp: sent {keys} of {keys} record(s) in 1 request(s); dead-lettered 0" in (
        flushed.stdout
    )
    (body,) = sandbox.requests
    assert body["activity_kind"] == "in-app-event-agg"
    assert len(body["data"]) == keys
    assert set(sandbox.totals) == set(count)
    assert sum(r["event_count"] for r in sandbox.totals.values()) == 480
    for rid, record in sandbox.totals.items():
        assert record["event_count"] == count[rid], rid
        assert record["event_revenue_usd"] == revenue[rid], rid
        true_users = len(users[rid])
        assert abs(record["event_unique_users"] - true_users) <= max(1, 0.03 * true_users)
        assert record["channel"] in {"applovin", "tiktok"}
    assert redis_client.zcard(KEYS.xmp_dirty("xmp")) == 0

    # the batch id XMP answered is in the CLI's summary and in the attempt log
    records = [
        r for r in AttemptLog(redis_client, KEYS, 10_000).iter_records()
        if r.get("destination") == "xmp"
    ]  # fmt: skip
    (attempt,) = records
    assert attempt["batch_id"]
    assert f"batch ids {attempt['batch_id']}" in flushed.stdout
    assert attempt["notifying_status"] == "sent"
    assert attempt["records"] == str(keys)
    assert attempt["response_code"] == "200"

    # a second flush has nothing to send
    again = run_cli(redis_url, path, "xmp", "flush")
    assert again.returncode == 0, again.stderr
    assert "xmp: sent 0 of 0 record(s) in 0 request(s)" in again.stdout
    assert len(sandbox.requests) == 1

    # the token appears nowhere: CLI output, attempt log, worker log
    for proc in (dry, flushed, again):
        assert TOKEN not in proc.stdout
        assert TOKEN not in proc.stderr
    assert TOKEN not in json.dumps(records)
    assert TOKEN not in worker.log()


def test_events_xmp_cannot_take_are_dead_lettered_by_the_worker(
    xmp_setup: tuple[Path, Producer, WorkerProcess],
    sandbox: SandboxXmp,
    redis_client: redis.Redis,
) -> None:
    _path, producer, worker = xmp_setup
    now = datetime.now(UTC)
    base = {
        "app_id": "com.example.game",
        "platform": "android",
        "event_name": "af_purchase",
        "event_time": (now - timedelta(hours=1)).isoformat(),
        "gaid": "38400000-8cf0-11bd-b23e-10b96e40000d",
        "media_source": "applovin_int",
        "country": "US",
        "revenue_usd": "1.990000",
    }
    aged = {**base, "event_id": "aged-1", "install_time": (now - timedelta(days=100)).isoformat()}
    no_install = {**base, "event_id": "no-install-1"}
    unknown = {**base, "event_id": "unknown-1", "install_time": now.isoformat(),
               "media_source": "someothernet_int"}  # fmt: skip
    fine = {**base, "event_id": "fine-1", "install_time": (now - timedelta(days=1)).isoformat()}
    for event in (aged, no_install, unknown, fine):
        assert len(producer.produce(event).accepted) == 1

    store = DeadLetterStore(redis_client, KEYS)
    wait_until(
        lambda: store.count() == 3 and counter(redis_client, "aggregated") == 1,
        30,
        "3 dead letters and 1 aggregated event",
        worker,
    )
    entry = store.get(delivery_id_for("aged-1", "xmp"))
    assert entry is not None
    assert entry.destination == "xmp"
    assert "older than 90 days" in entry.reason
    assert entry.reason.startswith("active_date: ")
    assert entry.envelope is not None
    assert entry.envelope.event.event_id == "aged-1"

    missing = store.get(delivery_id_for("no-install-1", "xmp"))
    assert missing is not None
    assert missing.reason == "active_date: the event has no install_time to take it from"
    channel = store.get(delivery_id_for("unknown-1", "xmp"))
    assert channel is not None
    assert channel.reason.startswith("channel: media source 'someothernet_int'")

    assert counter(redis_client, "dead_lettered") == 3
    assert redis_client.zcard(KEYS.xmp_dirty("xmp")) == 1  # only the good event's record
    assert sandbox.requests == []  # aggregation never sends by itself
    assert TOKEN not in worker.log()
    assert all(TOKEN not in e.model_dump_json() for e in store.iter_entries())


@pytest.mark.timeout(120)
def test_the_workers_flush_task_with_xmp_down_leaves_records_dirty_and_the_next_run_sends_them(
    redis_client: redis.Redis, sandbox: SandboxXmp, xmp_setup: tuple[Path, Producer, WorkerProcess]
) -> None:
    producer, worker = xmp_setup[1:]
    events = make_events(datetime.now(UTC), random.Random(77))[:60]
    assert all(r.ok for r in producer.produce_many(events))
    wait_until(
        lambda: counter(redis_client, "aggregated") == 60 and redis_client.llen(QUEUE) == 0,
        60,
        "60 aggregated deliveries",
        worker,
    )
    dirty = {m.decode() for m in redis_client.zrange(KEYS.xmp_dirty("xmp"), 0, -1)}  # type: ignore[union-attr]
    attempts = AttemptLog(redis_client, KEYS, 10_000)
    encoder = TaskMessageEncoder(Celery("postback_relay", set_as_current=False))

    def flush_task() -> None:
        """What beat publishes every flush_interval."""
        wire = encoder.encode(XMP_FLUSH_TASK, QUEUE, ("xmp",), "('xmp',)", str(uuid.uuid4()))
        redis_client.lpush(QUEUE, wire)

    def flush_attempts() -> list[dict[str, str]]:
        return [r for r in attempts.iter_records() if r.get("destination") == "xmp"]

    sandbox.fail_statuses = [503]  # XMP is down for one request
    flush_task()
    wait_until(
        lambda: "stay dirty for the next flush" in worker.log(), 30, "a failed flush", worker
    )
    (failed,) = flush_attempts()
    assert (failed["notifying_status"], failed["response_code"]) == ("failed", "503")
    assert {m.decode() for m in redis_client.zrange(KEYS.xmp_dirty("xmp"), 0, -1)} == dirty  # type: ignore[union-attr]
    assert sandbox.totals == {}

    flush_task()  # the next run: XMP is back
    wait_until(
        lambda: redis_client.zcard(KEYS.xmp_dirty("xmp")) == 0, 30, "the records sent", worker
    )
    assert set(sandbox.totals) == dirty
    assert sum(r["event_count"] for r in sandbox.totals.values()) == 60
    assert len(sandbox.requests) == 1
    assert [r["notifying_status"] for r in flush_attempts()] == ["failed", "sent"]
    assert TOKEN not in worker.log()
