"""The collector's on-call signals, read from a real Redis: when each queue was last consumed
and how the reconciler's runs ended (the alerts of deploy/prometheus/alerts.yml use them)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import redis
from prometheus_client.registry import CollectorRegistry

from config.destinations import parse_destinations
from config.keys import RedisKeys, queue_for
from config.kinds import KINDS
from tests.helpers import one_of_each_kind
from workers.metrics import RECONCILE_STATES, MetricsRecorder, RedisStateCollector

KEYS = RedisKeys("pr")


def scrape(client: redis.Redis, tmp_path: Path) -> CollectorRegistry:
    destinations = parse_destinations(
        tomllib.loads(one_of_each_kind("http://127.0.0.1:9", tmp_path / "token"))
    )
    registry = CollectorRegistry()
    registry.register(RedisStateCollector(client, KEYS, destinations, tuple(KINDS)))
    return registry


def test_a_queue_never_consumed_reads_0_and_a_consumed_one_its_last_time(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    recorder = MetricsRecorder(KEYS)
    with redis_client.pipeline() as pipe:
        recorder.consumed(pipe, {queue_for("templated"), queue_for("xmp")}, 1_000.0)
        recorder.consumed(pipe, {queue_for("templated")}, 1_250.5)
        recorder.consumed(pipe, set(), 9_999.0)  # a batch of nothing: no write
        pipe.execute()
    registry = scrape(redis_client, tmp_path)
    name = "postback_relay_queue_last_consumed_timestamp_seconds"
    got = {kind: registry.get_sample_value(name, {"queue": queue_for(kind)}) for kind in KINDS}
    assert got == {"templated": 1_250.5, "x_mact": 0.0, "xmp": 1_000.0, "redeliver": 0.0}


def test_reconcile_runs_are_counted_by_state_and_the_last_success_served_once_there_is_one(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    registry = scrape(redis_client, tmp_path)
    runs = "postback_relay_reconcile_runs_total"
    last = "postback_relay_reconcile_last_success_timestamp_seconds"
    # Every state of the file's source from the first scrape (rate() and increase() need the
    # zero), and no last success before a run has read the export.
    for state in RECONCILE_STATES:
        assert registry.get_sample_value(runs, {"source": "main", "state": state}) == 0
    assert registry.get_sample_value(last, {"source": "main"}) is None

    recorder = MetricsRecorder(KEYS)
    with redis_client.pipeline() as pipe:
        for state, at in [("failed", 10.0), ("done", 20.0), ("pending", 30.0), ("done", 40.0)]:
            recorder.reconcile_run(pipe, "main", state, at)
        pipe.execute()
    assert registry.get_sample_value(runs, {"source": "main", "state": "done"}) == 2
    assert registry.get_sample_value(runs, {"source": "main", "state": "failed"}) == 1
    assert registry.get_sample_value(runs, {"source": "main", "state": "locked"}) == 0
    assert registry.get_sample_value(last, {"source": "main"}) == 40.0  # done, not pending
