"""produce() -> received latency (p50/p99) at half of the capacity measured in the same run.

1. Capacity probe: W workers (defaults of ``postback-relay worker``), a backlog of --probe
   events produced at once, deliveries/s until the receiver has them all.
2. Steady load: events produced at half that rate for --seconds (produce_many every 10 ms with
   the events due), each event's produce time kept; the receiver (own process) stamps arrival.
   Latency = arrival - the time just before the produce_many() call that carried it.
3. Baseline: the same rate and duration through bare Celery workers (same pool, concurrency,
   prefetch) whose task records how long after its enqueue it ran: Celery's own floor.

Target: p99 <= 100 ms. The delay mover interval only matters for deliveries that wait in the
delay set (route delays, retries, rate-limit deferrals; none here); the prefetch multiplier
decides how many messages a busy worker holds back from idle ones. Both are printed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from common import (
    CORES,
    Receiver,
    RedisInfo,
    add_common_args,
    add_pool_args,
    bare_enqueue,
    effective_settings,
    header,
    machine,
    make_events,
    make_producer,
    new_run_id,
    percentile,
    pool_args,
    produce_all,
    redis_server,
    relay_env,
    row,
    run_main,
    start_bare_workers,
    start_relay_workers,
    stop_all,
    templated_toml,
    verdict,
    wait_for_count,
    workspace,
    write_destinations,
)

TARGET_P99_MS = 100.0
TICK = 0.01


def steady(rate: float, seconds: float, send: Callable[[int], None]) -> int:
    """Call ``send(k)`` every tick with the k items due so far at ``rate``; returns the total."""
    start = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(rate * elapsed) - sent
        if due > 0:
            send(due)
            sent += due
        time.sleep(TICK)
    return sent


def summary(latencies_ms: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else float("nan"),
    }


def fmt(s: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} ms" for k, v in s.items())


def relay_run(
    info: RedisInfo, receiver: Receiver, path: Path, args: argparse.Namespace
) -> tuple[float, float, list[float], int]:
    """(capacity/s, steady rate, latencies in ms, produced)."""
    env = relay_env(info.url, path, POSTBACK_RELAY_BATCH_SIZE=str(args.batch_size))
    producer = make_producer(info.url, path, batch_size=args.batch_size)
    workers = start_relay_workers(
        args.workers, env, path.parent, pool=args.pool, concurrency=args.concurrency
    )
    try:
        warm = 2 * args.workers * args.concurrency
        produce_all(producer, make_events(warm, "warm-" + new_run_id()))
        wait_for_count(receiver.count, warm, 30)
        receiver.reset()

        probe = make_events(args.probe, "probe-" + new_run_id())
        started = time.monotonic()
        produce_all(producer, probe)
        _, ended, got = wait_for_count(receiver.count, args.probe, 120)
        capacity = got / (ended - started)
        receiver.reset()

        target_rate = capacity * args.load
        pool = make_events(int(target_rate * args.seconds) + 100, new_run_id())
        produced_at: dict[str, float] = {}
        cursor = 0

        def send(k: int) -> None:
            nonlocal cursor
            batch = pool[cursor : cursor + k]
            cursor += k
            now = time.time()
            producer.produce_many(batch)
            for event in batch:
                produced_at[event["event_id"]] = now

        sent = steady(target_rate, args.seconds, send)
        wait_for_count(receiver.count, sent, 60)
        dump = receiver.dump()
    finally:
        stop_all(workers)
    latencies = []
    for at, target in zip(dump["times"], dump["targets"], strict=True):
        event_id = parse_qs(urlsplit(target).query)["id"][0]
        if event_id in produced_at:
            latencies.append((at - produced_at[event_id]) * 1000)
    return capacity, target_rate, latencies, sent


def bare_run(info: RedisInfo, workdir: Path, rate: float, args: argparse.Namespace, prefetch: int
             ) -> tuple[list[float], int]:  # fmt: skip
    from bench import bare_celery

    workers = start_bare_workers(
        args.workers, info.url, workdir, pool=args.pool, concurrency=args.concurrency,
        prefetch=prefetch,
    )  # fmt: skip
    try:
        events = make_events(int(rate * args.seconds) + 100, "bare-" + new_run_id())
        info.client.delete(bare_celery.LATENCY_KEY)
        info.client.set(bare_celery.DONE_KEY, 0)
        cursor = 0

        def send(k: int) -> None:
            nonlocal cursor
            now = time.time()
            bare_enqueue(
                info.client, bare_celery.STAMP_TASK, [(now, e) for e in events[cursor : cursor + k]]
            )
            cursor += k

        sent = steady(rate, args.seconds, send)
        wait_for_count(lambda: int(info.client.get(bare_celery.DONE_KEY) or 0), sent, 60)
        raw = info.client.lrange(bare_celery.LATENCY_KEY, 0, -1)
    finally:
        stop_all(workers)
    return [float(v) * 1000 for v in raw], sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=CORES)
    add_pool_args(parser)
    parser.add_argument("--probe", type=int, default=1_500, help="events in the capacity probe")
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the capacity")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady load duration")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="POSTBACK_RELAY_BATCH_SIZE (producer and worker)"
    )
    add_common_args(parser)
    args = parser.parse_args()
    args.pool, args.concurrency = pool_args(args)

    with workspace(args.keep) as workdir, redis_server(workdir, args.appendfsync) as info:
        receiver = Receiver(workdir, targets=True)
        try:
            path = write_destinations(workdir, templated_toml(receiver.url))
            settings = effective_settings(relay_env(info.url, path))
            header(
                "latency: produce() -> received at half the measured capacity",
                machine=machine(),
                redis=info.describe(),
                workers=f"{args.workers} process(es), pool={args.pool}, "
                f"concurrency={args.concurrency} each",
                settings=f"worker_prefetch_multiplier={settings.worker_prefetch_multiplier} "
                f"(up to {settings.worker_prefetch_multiplier * args.concurrency} messages "
                f"reserved per worker), delay_mover_interval="
                f"{settings.delay_mover_interval:g} s (not on this path: no delays or retries)",
            )
            capacity, rate, latencies, sent = relay_run(info, receiver, path, args)
        finally:
            receiver.stop()
        bare, bare_sent = bare_run(info, workdir, rate, args, settings.worker_prefetch_multiplier)

        row("capacity probe", f"{capacity:,.0f} deliveries/s", f"{args.probe:,} events backlog")
        row(
            f"postback-relay at {rate:,.0f}/s ({args.load:.0%})",
            fmt(summary(latencies)),
            f"{len(latencies):,} of {sent:,} received, {args.seconds:g} s",
        )
        row(
            f"baseline: bare Celery at {rate:,.0f}/s",
            fmt(summary(bare)),
            f"enqueue -> task ran; {len(bare):,} of {bare_sent:,}",
        )
        p99 = summary(latencies)["p99"]
        verdict(
            f"p99 <= {TARGET_P99_MS:.0f} ms",
            len(latencies) == sent and p99 <= TARGET_P99_MS,
            f"p99 {p99:.1f} ms",
        )


if __name__ == "__main__":
    run_main(main)
