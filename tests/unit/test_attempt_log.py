"""The attempt log's retention on a real Redis: a count bound on every append, an age bound at
most once a second per process (both approximate, as XADD/XTRIM ``~`` trim whole nodes)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import redis

from config.keys import RedisKeys
from schemas.attempts import EXPORT_FIELDS, AttemptRecord
from schemas.outcomes import Delivered, RetryLater
from workers.stores.attempts import AttemptLog

KEYS = RedisKeys("pr")
DAY = 24 * 3600


def fields(at: float) -> dict[str, Any]:
    return {"attempt_timestamp": int(at), "delivery_id": "d", "notifying_status": "sent"}


def record(at: float) -> AttemptRecord:
    return AttemptRecord.of(
        Delivered(200),
        at=datetime.fromtimestamp(at, UTC),
        url="https://partner.example/pb",
        method="GET",
        destination="d",
        duration_ms=1.0,
    )


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
        log.add(record(now))

    assert xtrim_calls(redis_client) == 1  # the first append trimmed; the next 19 did not
    records = list(log.iter_records())
    assert len(records) == 20
    assert all(int(r["attempt_timestamp"]) == int(now) for r in records)

    log._next_age_trim = time.monotonic()  # a second later, as far as the log can tell
    log.add(record(now))
    assert xtrim_calls(redis_client) == 2


def test_the_count_bound_holds_on_every_append(redis_client: redis.Redis) -> None:
    log = AttemptLog(redis_client, KEYS, max_records=100, max_age_seconds=DAY)
    now = time.time()
    for _ in range(450):
        log.add(record(now))
    # Approximate: whole nodes of 100 go, so between 100 and 199 remain, never all 450.
    assert 100 <= log.count() < 200


def test_a_batch_record_keeps_appmetricas_names_and_leaves_out_a_deliverys_fields(
    redis_client: redis.Redis,
) -> None:
    at = datetime(2026, 11, 25, 6, 0, 1, tzinfo=UTC)
    log = AttemptLog(redis_client, KEYS, max_records=100)
    log.add(
        AttemptRecord.of(
            RetryLater("XMP answered HTTP 503 code 503", 503, '{"code":503}'),
            at=at,
            url="https://xmp.example/s2s/postback/v2",
            method="POST",
            destination="xmp",
            duration_ms=12.5,
            records=200,
            batch_id="",
        )
    )
    (stored,) = list(log.iter_records())
    assert stored == {
        "attempt_datetime": "2026-11-25 06:00:01",
        "attempt_timestamp": str(int(at.timestamp())),
        "notifying_status": "failed",
        "response_code": "503",
        "response_body": '{"code":503}',
        "postback_url": "https://xmp.example/s2s/postback/v2",
        "postback_method": "POST",
        "destination": "xmp",
        "records": "200",
        "batch_id": "",
        "error": "XMP answered HTTP 503 code 503",
        "duration_ms": "12.5",
        "attribution": "",
    }
    # The export's columns: AppMetrica's postbacks export, in its order.
    assert EXPORT_FIELDS == (
        "attempt_datetime", "attempt_timestamp", "notifying_status", "response_code",
        "response_body", "postback_url", "postback_method", "conversion_datetime",
        "conversion_timestamp", "event_name", "application_id", "destination", "delivery_id",
        "attempt", "error", "duration_ms", "attribution",
    )  # fmt: skip
