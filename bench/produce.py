"""produce_many() throughput from one process vs Celery's own ``task.delay()`` loop.

Both publish the same events to the same Redis: produce_many in caller batches of --batch
events (each batch validates, routes, encodes and enqueues with one Lua call), the baseline
calls ``bench.noop.delay(event)`` of a trivial Celery app once per message. No worker runs;
the queues are emptied afterwards. Target: >= 10,000 events/s and >= 6x the .delay() loop.

``--wait-replicas N`` also starts a master with N replicas (workers/dev/redis_topology.py) and
measures produce_many() and produce() on it with and without POSTBACK_RELAY_PRODUCE_WAIT_REPLICAS
=N (Redis WAIT after each enqueue), in the same run: what the replica acknowledgement costs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (
    add_common_args,
    header,
    machine,
    make_events,
    make_producer,
    new_run_id,
    rate,
    redis_server,
    row,
    run_main,
    templated_toml,
    verdict,
    workspace,
    write_destinations,
)

from config.keys import queue_for
from workers.dev.redis_topology import Node, RedisTopology

TARGET_RATE = 10_000
TARGET_RATIO = 6.0
ROUNDS = 3  # --wait-replicas: alternating rounds with and without WAIT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500, help="events per produce_many call")
    parser.add_argument(
        "--delay-messages",
        type=int,
        default=None,
        help="messages for the .delay() loop (default: --events, at most 10,000)",
    )
    parser.add_argument("--single", type=int, default=2_000, help="events for a produce() loop")
    parser.add_argument(
        "--wait-replicas",
        type=int,
        default=0,
        metavar="N",
        help="also measure on a master with N replicas, with and without WAIT for N of them",
    )
    add_common_args(parser)
    args = parser.parse_args()
    delay_n = args.delay_messages or min(args.events, 10_000)

    with workspace(args.keep) as workdir, redis_server(workdir, args.appendfsync) as info:
        header(
            "produce: produce_many() vs Celery task.delay() loop (one process)",
            machine=machine(),
            redis=info.describe(),
            events=f"{args.events:,} installs, 1 templated destination (1 delivery each)",
            batch=f"{args.batch} events per produce_many() call",
        )
        producer = make_producer(info.url, write_destinations(workdir, templated_toml(
            "http://127.0.0.1:9")))  # fmt: skip
        queue = queue_for("templated")

        # warm-up (imports, Lua script load, pydantic schema caches)
        producer.produce_many(make_events(200, "warm-" + new_run_id()))
        info.client.delete(queue)

        events = make_events(args.events, new_run_id())
        started = time.perf_counter()
        accepted = 0
        for start in range(0, len(events), args.batch):
            for result in producer.produce_many(events[start : start + args.batch]):
                accepted += len(result.accepted)
        many_s = time.perf_counter() - started
        queued = info.client.llen(queue)
        info.client.delete(queue)
        many_rate = rate(args.events, many_s)

        singles = make_events(args.single, new_run_id())
        started = time.perf_counter()
        for event in singles:
            producer.produce(event)
        single_rate = rate(args.single, time.perf_counter() - started)
        info.client.delete(queue)

        from bench import bare_celery

        bare_celery.configure(info.url)
        bare_celery.noop.delay(events[0])  # warm-up: connection, producer pool
        info.client.delete(bare_celery.QUEUE)
        started = time.perf_counter()
        for event in events[:delay_n]:
            bare_celery.noop.delay(event)
        delay_s = time.perf_counter() - started
        delay_rate = rate(delay_n, delay_s)
        delay_queued = info.client.llen(bare_celery.QUEUE)
        info.client.delete(bare_celery.QUEUE)

        row(
            "produce_many()",
            f"{many_rate:,.0f} events/s",
            f"{args.events:,} in {many_s:.2f} s; {accepted:,} accepted, {queued:,} on the queue",
        )
        row("produce() one at a time (for reference)", f"{single_rate:,.0f} events/s",
            f"{args.single:,} events")  # fmt: skip
        row(
            "baseline: Celery .delay() loop",
            f"{delay_rate:,.0f} msgs/s",
            f"{delay_n:,} in {delay_s:.2f} s; {delay_queued:,} on the queue",
        )
        ratio = many_rate / delay_rate
        row("produce_many / .delay()", f"{ratio:.1f}x")
        verdict(
            f">= {TARGET_RATE:,} events/s and >= {TARGET_RATIO:g}x the .delay() loop",
            many_rate >= TARGET_RATE and ratio >= TARGET_RATIO,
            f"{many_rate:,.0f} events/s, {ratio:.1f}x",
        )
    if args.wait_replicas:
        with workspace(args.keep) as workdir:
            replica_wait_rows(workdir, args)


def replica_wait_rows(workdir: Path, args: argparse.Namespace) -> None:
    """produce_many() and produce() on a replicated master, without and with WAIT: rounds of
    each in turn, the best round of each reported (the machine's load drifts between them)."""
    with RedisTopology(workdir / "replicated", replicas=args.wait_replicas, sentinels=0) as nodes:
        url = nodes.first_master_url
        if args.appendfsync:
            for node in nodes.nodes:
                Node(node.port).client().config_set("appendfsync", args.appendfsync)
        path = write_destinations(workdir, templated_toml("http://127.0.0.1:9"))
        print(f"\nreplicated: a master and {args.wait_replicas} replica(s) at {url}, "
              f"best of {ROUNDS} alternating rounds")  # fmt: skip
        rates: dict[int, tuple[float, float]] = {0: (0.0, 0.0), args.wait_replicas: (0.0, 0.0)}
        producers = {wait: make_producer(url, path, produce_wait_replicas=wait) for wait in rates}
        for _ in range(ROUNDS):
            for wait, producer in producers.items():
                producer.produce_many(make_events(200, "warm-" + new_run_id()))
                events = make_events(args.events, new_run_id())
                started = time.perf_counter()
                for start in range(0, len(events), args.batch):
                    producer.produce_many(events[start : start + args.batch])
                many = rate(args.events, time.perf_counter() - started)
                singles = make_events(args.single, new_run_id())
                started = time.perf_counter()
                for event in singles:
                    producer.produce(event)
                single = rate(args.single, time.perf_counter() - started)
                producer.redis.flushdb()
                best_many, best_single = rates[wait]
                rates[wait] = (max(best_many, many), max(best_single, single))
        for wait, (many, single) in rates.items():
            label = f"WAIT {wait} replica(s)" if wait else "no WAIT"
            row(f"produce_many(), {label}", f"{many:,.0f} events/s",
                f"{args.batch} events per call")  # fmt: skip
            row(f"produce() one at a time, {label}", f"{single:,.0f} events/s")
        (many_0, single_0), (many_n, single_n) = rates[0], rates[args.wait_replicas]
        row("WAIT's cost, produce_many()", f"{1 - many_n / many_0:.0%} fewer events/s")
        row("WAIT's cost, produce()", f"{1 - single_n / single_0:.0%} fewer events/s")


if __name__ == "__main__":
    run_main(main)
