"""XMP: events/s aggregated (in a loop and through workers) and HTTP requests per 1,000 events.

1. ``XmpAggregator.add`` in a loop in this process (events parsed beforehand), vs a baseline
   of one trivial writing Lua call (an INCR) per event on the same Redis: the floor of one
   durable round trip per event.
2. Through workers: produce_many -> W ``postback-relay worker --queues xmp`` processes; the
   clock stops when the ``xmp|aggregated`` counter reaches N. Baseline: bare Celery no-op
   tasks with the same workers, pool and concurrency (as in deliver_fast).
3. One flush (``XmpFlusher.flush``, as the periodic task runs it) to the sandbox XMP server:
   HTTP requests and records sent, per 1,000 events aggregated since the previous flush,
   against one request per event for a per-event postback; the sandbox's totals are checked.

The brief sets no target for XMP; judged here: a flush sends ceil(records / 200) requests (the
documented batch size) with the exact totals, and worker aggregation reaches >= 0.8x the bare
Celery figure (deliver_fast's target).
"""

from __future__ import annotations

import argparse
import math
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from common import (
    CORES,
    IDFA_NS,
    RedisInfo,
    add_common_args,
    add_pool_args,
    header,
    machine,
    make_producer,
    measure_bare,
    new_run_id,
    pool_args,
    produce_all,
    redis_server,
    relay_env,
    row,
    run_main,
    start_relay_workers,
    stop_all,
    verdict,
    wait_for_count,
    workspace,
    write_destinations,
)

from config.keys import RedisKeys
from config.kinds.xmp import XmpDestination
from schemas.event import ConversionEvent
from workers.delivery.client import HttpClient
from workers.delivery.ratelimit import PauseRegistry
from workers.delivery.sender import Sender
from workers.kinds.xmp.aggregate import XmpAggregator
from workers.kinds.xmp.flush import XmpFlusher
from workers.kinds.xmp.sandbox import SandboxXmp
from workers.stores.deadletter import DeadLetterStore

TOKEN = "xmp-bench-token-5b2e91c4d7"
SOURCES = ["applovin_int", "unityads_int", "mintegral_int", "tiktok_int", "organic"]
COUNTRIES = ["US", "DE", "JP", "BR", "IN", "FR"]
TARGET_RATIO = 0.8


def destinations_toml(url: str) -> str:
    return f"""
[[destination]]
name = "xmp"
kind = "xmp"
url = "{url}"
credentials = {{ xmp_token = {{ env = "XMP_TOKEN" }} }}
[[destination.routes]]
type = "install"
[[destination.routes]]
type = "event"
"""


def xmp_events(count: int, run_id: str, record_keys: int) -> list[dict[str, Any]]:
    """Installs and purchases spread over about ``record_keys`` XMP records of one day."""
    now = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    events = []
    for i in range(count):
        key = i % record_keys
        purchase = key % 2 == 1
        event: dict[str, Any] = {
            "event_id": f"{run_id}-{i}",
            "app_id": "com.example.game",
            "platform": "android",
            "event_name": "af_purchase" if purchase else "install",
            "event_time": (now - timedelta(hours=1)).isoformat(),
            "install_time": (now - timedelta(hours=2)).isoformat(),
            "gaid": str(uuid.uuid5(IDFA_NS, f"{run_id}-{i % 5000}")),
            "media_source": SOURCES[key % len(SOURCES)],
            "campaign_id": f"c-{key // 2}",
            "adset_id": "as-1",
            "ad_id": "ad-1",
            "country": COUNTRIES[key % len(COUNTRIES)],
        }
        if purchase:
            event["revenue_usd"] = f"{(i % 1000) / 100 + 0.99:.2f}"
        events.append(event)
    return events


def aggregated(client: redis.Redis, keys: RedisKeys) -> int:
    raw = client.hget(keys.metrics_counters(), "xmp|aggregated")
    return int(raw) if raw else 0


def loop_figures(
    info: RedisInfo, dest: XmpDestination, keys: RedisKeys, count: int, record_keys: int
) -> tuple[float, float]:
    parsed = [ConversionEvent.parse(e) for e in xmp_events(count, new_run_id(), record_keys)]
    aggregator = XmpAggregator(info.client, keys)
    now = datetime.now(UTC)
    started = time.perf_counter()
    for event in parsed:
        aggregator.add(dest, event, now)
    add_rate = count / (time.perf_counter() - started)

    trivial = info.client.register_script("return redis.call('INCR', KEYS[1])")
    started = time.perf_counter()
    for _ in range(count):
        trivial(keys=["bench:xmp:floor"], args=[])
    floor_rate = count / (time.perf_counter() - started)
    return add_rate, floor_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop-events", type=int, default=5_000)
    parser.add_argument("--worker-events", type=int, default=4_000)
    parser.add_argument("--record-keys", type=int, default=300, help="distinct XMP records")
    parser.add_argument("--workers", type=int, default=CORES)
    add_pool_args(parser)
    add_common_args(parser)
    args = parser.parse_args()
    args.pool, args.concurrency = pool_args(args)
    keys = RedisKeys()

    with (
        workspace(args.keep) as workdir,
        redis_server(workdir, args.appendfsync) as info,
        SandboxXmp(token=TOKEN) as sandbox,
    ):
        path = write_destinations(workdir, destinations_toml(sandbox.url))
        env = relay_env(info.url, path, XMP_TOKEN=TOKEN)
        header(
            "xmp: aggregation rate and HTTP requests per 1,000 events",
            machine=machine(),
            redis=info.describe(),
            events=f"installs + purchases over ~{args.record_keys} record keys (one day)",
            workers=f"{args.workers} x {args.pool}, concurrency {args.concurrency}, --queues xmp",
        )
        os.environ["XMP_TOKEN"] = TOKEN
        producer = make_producer(info.url, path)
        # The producer never reads credentials; the in-process flush below sends, so it does.
        dest = producer.destinations.with_secrets(kinds=["xmp"]).get("xmp")
        assert isinstance(dest, XmpDestination)

        add_rate, floor_rate = loop_figures(info, dest, keys, args.loop_events, args.record_keys)

        workers = start_relay_workers(
            args.workers,
            env,
            workdir,
            queues="xmp",
            pool=args.pool,
            concurrency=args.concurrency,
            tag="xmp",
        )
        try:
            warm = xmp_events(2 * args.workers * args.concurrency, "warm-" + new_run_id(), 10)
            produce_all(producer, warm)
            wait_for_count(lambda: aggregated(info.client, keys), len(warm), 30)
            base = aggregated(info.client, keys)
            events = xmp_events(args.worker_events, new_run_id(), args.record_keys)
            started = time.monotonic()
            produce_all(producer, events)
            done, ended, got = wait_for_count(
                lambda: aggregated(info.client, keys) - base, len(events), 120
            )
            worker_rate = got / (ended - started)
        finally:
            stop_all(workers)

        bare = measure_bare(
            info, workdir, args.worker_events, workers=args.workers, pool=args.pool,
            concurrency=args.concurrency,
        )  # fmt: skip

        since_flush = args.loop_events + len(warm) + got
        flusher = XmpFlusher(
            info.client,
            keys,
            Sender(HttpClient("postback-relay-bench")),
            dead_letters=DeadLetterStore(info.client, keys),
            pauses=PauseRegistry(info.client, keys),
        )
        flush_started = time.perf_counter()
        report = flusher.flush(dest)
        flush_s = time.perf_counter() - flush_started
        sandbox_count = sum(int(r["event_count"]) for r in sandbox.totals.values())

        row("XmpAggregator.add() loop", f"{add_rate:,.0f} events/s",
            f"{args.loop_events:,} events, one Lua call each")  # fmt: skip
        row("baseline: trivial writing Lua call loop", f"{floor_rate:,.0f} calls/s",
            "one INCR each: the floor of one durable round trip per event")  # fmt: skip
        row(
            "through workers (aggregated)",
            f"{worker_rate:,.0f} events/s",
            f"{got:,} of {len(events):,} in {ended - started:.2f} s"
            + ("" if done else " - INCOMPLETE"),
        )
        row("baseline: bare Celery no-op", f"{bare.per_second:,.0f} tasks/s",
            f"{bare.count:,} in {bare.seconds:.2f} s")  # fmt: skip
        ratio = worker_rate / bare.per_second
        row("workers / bare Celery", f"{ratio:.2f}x")
        expected_requests = math.ceil(report.records / dest.batch_size)
        per_1000 = report.requests * 1000 / since_flush
        row(
            "one flush",
            f"{report.requests} request(s), {report.sent:,} of {report.records:,} records",
            f"{flush_s * 1000:.0f} ms; expected {expected_requests} (batches of "
            f"{dest.batch_size})" + (f"; failed: {report.failed}" if report.failed else ""),
        )
        row(
            "HTTP requests per 1,000 events",
            f"{per_1000:.2f}",
            f"{since_flush:,} events since the last flush; baseline: 1,000 for a postback "
            "per event",
        )
        row(
            "sandbox totals match",
            "yes" if sandbox_count == since_flush else "NO",
            f"event_count sum {sandbox_count:,} vs {since_flush:,} events aggregated",
        )
        met = (
            report.requests == expected_requests
            and report.sent == report.records
            and sandbox_count == since_flush
            and ratio >= TARGET_RATIO
        )
        verdict(
            "(none in the brief) flush = ceil(records/200) requests with exact totals, and "
            f"worker aggregation >= {TARGET_RATIO:g}x bare Celery",
            met,
            f"{report.requests} request(s) for {report.records} records, {ratio:.2f}x",
        )


if __name__ == "__main__":
    run_main(main)
