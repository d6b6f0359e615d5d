"""The attempt log's retention on a real Redis: a count bound on every append, an age bound at
most once a second per process (both approximate, as XADD/XTRIM ``~`` trim whole nodes)."""

from __future__ import annotations

import time
from typing import Any

import redis

from config.keys import RedisKeys
from workers.stores.attempts import AttemptLog

KEYS = RedisKeys("pr")
DAY = 24 * 3600


def fields(at: float) -> dict[str, Any]:
    return {"attempt_timestamp": int(at), "delivery_id": "d", "notifying_status": "sent"}


def xtrim_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_xtrim", {}).get("calls", 0))


def test_records_older_than_the_age_limit_are_trimmed_once_a_second_not_per_record(
    redis_client: redis.Redis,
) -> None:
    now = time.time()
    old_ms = int((now - 3 * DAY) * 1000)
    for i in range(300):  # three full stream nodes of records three days old
        redis_client.xadd(KEYS.attempts(), fields(now - 3 * DAY), id=f"{old_ms}-{i}")
    log = AttemptLog(redis_client, KEYS, max_records=100_000, max_age_seconds=DAY)
    redis_client.config_resetstat()

    for _ in range(20):
        log.record_fields(fields(now))

    assert xtrim_calls(redis_client) == 1  # the first append trimmed; the next 19 did not
    records = list(log.iter_records())
    assert len(records) == 20
    assert all(int(r["attempt_timestamp"]) == int(now) for r in records)

    log._next_age_trim = time.monotonic()  # a second later, as far as the log can tell
    log.record_fields(fields(now))
    assert xtrim_calls(redis_client) == 2


def test_the_count_bound_holds_on_every_append(redis_client: redis.Redis) -> None:
    log = AttemptLog(redis_client, KEYS, max_records=100, max_age_seconds=DAY)
    now = time.time()
    for _ in range(450):
        log.record_fields(fields(now))
    # Approximate: whole nodes of 100 go, so between 100 and 199 remain, never all 450.
    assert 100 <= log.count() < 200
