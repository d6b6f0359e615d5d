"""Keys written before the hash tag (pr:...) move to {pr}:... with their data, once (real Redis)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from config.keys import RedisKeys, queue_for
from producers.produce import Producer
from schemas.envelope import DeliveryEnvelope
from workers.broker.keys import UNACKED
from workers.broker.wire import decode_task_args
from workers.cli.keys import migrate_keys
from workers.delivery.ratelimit import PauseRegistry
from workers.stores.deadletter import DeadLetterStore
from workers.stores.keymigration import legacy_keys, migrate_legacy_keys
from workers.stores.ledger import DeliveryLedger

KEYS = RedisKeys("pr")
QUEUE = queue_for("templated")
DESTINATIONS = """
[[destination]]
name = "a"
kind = "templated"
url = "https://a.example/i"
[[destination.routes]]
type = "install"
"""


def test_every_project_key_is_under_one_hash_tag() -> None:
    names = [
        KEYS.dedupe("d"), KEYS.delayed(QUEUE), KEYS.dead_letters(), KEYS.ledger(),
        KEYS.ledger_messages(), KEYS.ledger_drained(), KEYS.paused("a"), KEYS.lock("x"),
        KEYS.reconciled("s", "i"), KEYS.xmp_record("x", "r"), KEYS.attempts(),
    ]  # fmt: skip
    assert all(name.startswith("{pr}:") for name in names)
    assert RedisKeys("relay").ledger() == "{relay}:ledger"


def old_deployment(
    redis_client: redis.Redis, make_producer: Callable[[Path], Producer], path: Path
) -> list[str]:
    """What a release before 0.3 left in Redis: the same data under pr:... names."""
    producer = make_producer(path)
    result = producer.produce({"event_id": "e1", "app_id": "id1", "platform": "ios",
                               "event_name": "install", "event_time": "2026-11-22T10:00:00Z"})  # fmt: skip
    wire = redis_client.lindex(QUEUE, 0)
    assert wire is not None
    delivery = DeliveryEnvelope.from_task_arg(decode_task_args(wire.decode())[1][0])
    DeadLetterStore(redis_client, KEYS).add_envelope(delivery, "HTTP 400")
    PauseRegistry(redis_client, KEYS).pause("a", 600, "HTTP 401")
    redis_client.hset(UNACKED, "tag", b"[]")  # kombu's: never ours to move
    new_names = [k.decode() for k in redis_client.scan_iter(match="{pr}:*")]
    for name in new_names:
        redis_client.rename(name, name.replace("{pr}:", "pr:", 1))
    assert result.accepted
    return new_names


def test_an_old_deployments_keys_move_with_their_values_and_expiry_and_only_once(
    redis_client: redis.Redis,
    make_producer: Callable[[Path], Producer],
    write_destinations: Callable[[str], Path],
) -> None:
    new_names = old_deployment(redis_client, make_producer, write_destinations(DESTINATIONS))
    assert len(new_names) >= 6
    assert len(legacy_keys(redis_client, KEYS)) == len(new_names)

    report = migrate_legacy_keys(redis_client, KEYS)
    assert (report.renamed, report.conflicts) == (len(new_names), [])
    assert legacy_keys(redis_client, KEYS) == []
    store = DeadLetterStore(redis_client, KEYS)
    assert store.count() == 1
    assert store.counts_by_destination() == {"a": 1}
    assert DeliveryLedger(redis_client, KEYS, 60).size() == 1
    assert PauseRegistry(redis_client, KEYS).paused_until("a") is not None
    dedupe = next(n for n in new_names if n.startswith("{pr}:dedupe:"))
    assert 0 < redis_client.ttl(dedupe) <= 86_400 * 30
    assert redis_client.hlen(UNACKED) == 1
    assert redis_client.llen(QUEUE) == 1

    again = migrate_legacy_keys(redis_client, KEYS)
    assert (again.renamed, again.conflicts) == (0, [])


def test_a_key_the_new_release_already_wrote_is_never_overwritten(
    redis_client: redis.Redis,
) -> None:
    redis_client.set("pr:paused:a", "old")
    redis_client.set("{pr}:paused:a", "new")
    redis_client.set("pr:paused:b", "old")
    report = migrate_legacy_keys(redis_client, KEYS)
    assert (report.renamed, report.conflicts) == (1, ["pr:paused:a"])
    assert redis_client.get("{pr}:paused:a") == b"new"
    assert redis_client.get("pr:paused:a") == b"old"
    assert redis_client.get("{pr}:paused:b") == b"old"


def test_two_migrations_at_once_move_each_key_once(redis_client: redis.Redis) -> None:
    for i in range(300):
        redis_client.set(f"pr:dedupe:{i}", "1")
    reports = []
    threads = [
        threading.Thread(target=lambda: reports.append(migrate_legacy_keys(redis_client, KEYS)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.renamed for r in reports) == 300
    assert [c for r in reports for c in r.conflicts] == []
    assert len(list(redis_client.scan_iter(match="{pr}:dedupe:*"))) == 300


@pytest.mark.parametrize(("conflict", "exit_code"), [(False, 0), (True, 1)])
def test_the_migrate_keys_command_reports_and_exits_1_on_a_conflict(
    redis_client: redis.Redis,
    redis_url: str,
    write_destinations: Callable[[str], Path],
    conflict: bool,
    exit_code: int,
) -> None:
    redis_client.set("pr:ledger:drained", "x")
    if conflict:
        redis_client.set("{pr}:ledger:drained", "y")
    env = {
        "POSTBACK_RELAY_REDIS_URL": redis_url,
        "POSTBACK_RELAY_DESTINATIONS_FILE": str(write_destinations(DESTINATIONS)),
    }
    result = CliRunner().invoke(migrate_keys, [], env=env)
    assert result.exit_code == exit_code, result.output
    assert f"renamed {0 if conflict else 1} key(s) to {{pr}}:..." in result.output
    assert ("pr:ledger:drained" in result.output) is conflict
