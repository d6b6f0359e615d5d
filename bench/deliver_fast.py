"""End-to-end deliveries/s against a partner that answers at once, vs a bare Celery pipeline.

postback-relay: W ``postback-relay worker`` processes (the worker's default pool) on the
templated queue; the clock runs from the first produce_many() call until the receiver (its own
process) has counted all N requests. Baseline: W workers of bench/bare_celery.py (a no-op task
that only increments a Redis counter) with the same pool, concurrency, prefetch, acks_late,
events and log level; its N messages are published in the same wire form, one round trip per
500, and the clock stops when the counter reaches N. Target: >= 0.8x the bare Celery figure.

Two informative references (not the target's baseline): the same bare workers with a task that
makes one pooled ``requests`` GET to the same receiver (the least any delivery costs, which
tells postback-relay's own overhead apart from the price of an HTTP request), and the bare
no-op on postback-relay's kombu transport with its task-event batching (how much of Celery's
own per-message cost postback-relay trims, so the ratio is not read as pipeline work alone).

A third reference, another system a user could choose: arq + httpx (bench/arq_reference.py),
W arq worker processes with max_jobs = the concurrency, jobs pipelined into the same Redis,
one pooled GET each to the same receiver; measured by the very code that measures
postback-relay (``measure_delivery``). Skipped, with the reason, when the ``bench`` dependency
group is not installed (bench/README.md). A table ends the output: each system's
deliveries/s, worker CPU per delivery and both as ratios to postback-relay.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import (
    CORES,
    Receiver,
    RedisInfo,
    Timed,
    WorkerProc,
    add_arq_args,
    add_common_args,
    add_pool_args,
    comparison_table,
    effective_settings,
    header,
    log_warning_count,
    machine,
    make_events,
    make_producer,
    measure_bare,
    new_run_id,
    pool_args,
    produce_all,
    redis_cpu_seconds,
    redis_server,
    relay_env,
    row,
    run_main,
    start_arq_reference,
    start_relay_workers,
    stop_all,
    templated_toml,
    verdict,
    wait_for_count,
    worker_cpu_seconds,
    workspace,
    write_destinations,
)

TARGET_RATIO = 0.8
POOL_FULL = "Connection pool is full"


def measure_delivery(
    info: RedisInfo,
    receiver: Receiver,
    send: Callable[[Sequence[dict[str, Any]]], object],
    workers: list[WorkerProc],
    warm: int,
    count: int,
) -> Timed:
    """``send`` events -> the receiver has counted them all: postback-relay (produce_many) and
    the arq reference (its producer) measured by the same code."""
    receiver.reset()
    send(make_events(warm, "warm-" + new_run_id()))
    wait_for_count(receiver.count, warm, 30)
    receiver.reset()
    events = make_events(count, new_run_id())
    cpu, redis_cpu = worker_cpu_seconds(workers), redis_cpu_seconds(info.client)
    started = time.monotonic()
    send(events)
    enqueued = time.monotonic() - started
    done, ended, got = wait_for_count(receiver.count, count, timeout=max(60.0, count / 50))
    stats = receiver.stats()
    span = (stats["last"] - stats["first"]) if stats["count"] > 1 else float("nan")
    return Timed(
        got,
        ended - started,
        done,
        {
            "enqueue_s": enqueued,
            "receive_span_s": span,
            "cpu_ms": (worker_cpu_seconds(workers) - cpu) * 1000 / max(1, got),
            "redis_cpu_ms": (redis_cpu_seconds(info.client) - redis_cpu) * 1000 / max(1, got),
        },
    )


def measure_arq(
    args: argparse.Namespace, info: RedisInfo, receiver: Receiver, workdir: Path
) -> Timed | None:
    """The arq + httpx reference: as many processes and jobs at once as postback-relay's
    workers, measured by the same code (None when skipped)."""
    arq = start_arq_reference(
        args, info.url, workdir, receiver.url, workers=args.workers, concurrency=args.concurrency
    )
    if arq is None:
        return None
    with arq:
        warm = 2 * args.workers * args.concurrency
        return measure_delivery(info, receiver, arq.enqueue, arq.workers, warm, args.deliveries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deliveries", type=int, default=5_000)
    parser.add_argument("--workers", type=int, default=CORES, help="worker processes")
    add_pool_args(parser)
    parser.add_argument(
        "--batch-sizes",
        default="",
        help="comma-separated POSTBACK_RELAY_BATCH_SIZE values, each measured in this run "
        "(the first is the one compared with the baselines); default: the setting's default",
    )
    parser.add_argument(
        "--no-http-reference", action="store_true", help="skip the bare Celery + GET reference"
    )
    add_arq_args(parser)
    add_common_args(parser)
    args = parser.parse_args()
    args.pool, args.concurrency = pool_args(args)

    with workspace(args.keep) as workdir, redis_server(workdir, args.appendfsync) as info:
        receiver = Receiver(workdir)
        try:
            path = write_destinations(workdir, templated_toml(receiver.url))
            env = relay_env(info.url, path)
            settings = effective_settings(env)
            header(
                "deliver_fast: produce -> worker -> partner answering at once",
                machine=machine(),
                redis=info.describe(),
                workers=f"{args.workers} process(es), pool={args.pool}, "
                f"concurrency={args.concurrency} each, prefetch multiplier="
                f"{settings.worker_prefetch_multiplier}, log level={settings.log_level}",
                deliveries=f"{args.deliveries:,} (1 templated destination, GET, 200 at once)",
            )
            sizes = [int(n) for n in args.batch_sizes.split(",") if n] or [settings.batch_size]
            relays: dict[int, Timed] = {}
            pool_full = 0
            for size in sizes:
                producer = make_producer(info.url, path, batch_size=size)
                workers = start_relay_workers(
                    args.workers,
                    {**env, "POSTBACK_RELAY_BATCH_SIZE": str(size)},
                    workdir,
                    pool=args.pool,
                    concurrency=args.concurrency,
                    tag=f"relay-n{size}",
                )
                try:
                    relays[size] = measure_delivery(
                        info,
                        receiver,
                        functools.partial(produce_all, producer),
                        workers,
                        2 * args.workers * args.concurrency,
                        args.deliveries,
                    )
                    pool_full += log_warning_count(workers, POOL_FULL)
                finally:
                    stop_all(workers)
            relay = relays[sizes[0]]

            def bare_run(**kwargs: Any) -> Timed:
                return measure_bare(
                    info,
                    workdir,
                    args.deliveries,
                    workers=args.workers,
                    pool=args.pool,
                    concurrency=args.concurrency,
                    prefetch=settings.worker_prefetch_multiplier,
                    **kwargs,
                )

            bare = bare_run()
            tuned = bare_run(tuned=True)
            http_ref = None if args.no_http_reference else bare_run(http_url=receiver.url)
            arq_ref = measure_arq(args, info, receiver, workdir)
        finally:
            receiver.stop()

        for size, timed in relays.items():
            row(
                f"batch size {size}: deliveries/s, worker CPU per delivery",
                f"{timed.per_second:,.0f} /s, {timed.extra['cpu_ms']:.2f} ms",
                f"x{timed.per_second / relay.per_second:.2f} rate, "
                f"x{relay.extra['cpu_ms'] / timed.extra['cpu_ms']:.2f} CPU efficiency vs batch "
                f"size {sizes[0]}" + ("" if timed.done else " - INCOMPLETE"),
            )
        row(
            f"postback-relay deliveries/s (batch size {sizes[0]})",
            f"{relay.per_second:,.0f} /s",
            f"{relay.count:,} received in {relay.seconds:.2f} s"
            + ("" if relay.done else " - INCOMPLETE")
            + f"; enqueue took {relay.extra['enqueue_s']:.2f} s; first->last receipt "
            f"{relay.extra['receive_span_s']:.2f} s",
        )
        row(
            "baseline: bare Celery no-op tasks/s",
            f"{bare.per_second:,.0f} /s",
            f"{bare.count:,} in {bare.seconds:.2f} s" + ("" if bare.done else " - INCOMPLETE"),
        )
        row(
            "reference: bare no-op, relay transport+events",
            f"{tuned.per_second:,.0f} /s",
            f"{tuned.count:,} in {tuned.seconds:.2f} s" + ("" if tuned.done else " - INCOMPLETE"),
        )
        if http_ref is not None:
            row(
                "reference: bare Celery + one requests GET/s",
                f"{http_ref.per_second:,.0f} /s",
                f"{http_ref.count:,} in {http_ref.seconds:.2f} s"
                + ("" if http_ref.done else " - INCOMPLETE"),
            )
        ratio = relay.per_second / bare.per_second
        row("postback-relay / bare Celery no-op", f"{ratio:.2f}x")
        row(
            "postback-relay / bare no-op, relay transport",
            f"{relay.per_second / tuned.per_second:.2f}x",
        )
        if http_ref is not None:
            row(
                "postback-relay / bare Celery + GET",
                f"{relay.per_second / http_ref.per_second:.2f}x",
            )
        row(
            "worker CPU per message (user+sys)",
            f"relay {relay.extra['cpu_ms']:.2f} ms, no-op {bare.extra['cpu_ms']:.2f} ms, "
            f"no-op on relay transport {tuned.extra['cpu_ms']:.2f} ms"
            + ("" if http_ref is None else f", GET {http_ref.extra['cpu_ms']:.2f} ms"),
            "less sensitive than rates to other load on the machine; "
            f"CPU ratio no-op/relay {bare.extra['cpu_ms'] / relay.extra['cpu_ms']:.2f}",
        )
        row(
            "redis-server CPU per message",
            f"relay {relay.extra['redis_cpu_ms']:.2f} ms, no-op {bare.extra['redis_cpu_ms']:.2f} ms"
            + ("" if http_ref is None else f", GET {http_ref.extra['redis_cpu_ms']:.2f} ms"),
        )
        row(
            "machine time per message (cores / rate)",
            f"relay {CORES * 1000 / relay.per_second:.2f} ms, "
            f"no-op {CORES * 1000 / bare.per_second:.2f} ms"
            + ("" if http_ref is None else f", GET {CORES * 1000 / http_ref.per_second:.2f} ms"),
        )
        if pool_full:
            row("urllib3 'Connection pool is full' warnings", f"{pool_full:,}")
        each = f"{args.workers} process(es) x{args.concurrency}"
        comparison_table(
            [
                (system + ("" if m.done else " INCOMPLETE"), m.per_second, m.extra["cpu_ms"])
                for system, m in [
                    (f"postback-relay ({args.pool}, {each})", relay),
                    ("bare Celery no-op task, no HTTP", bare),
                    ("bare Celery no-op, relay transport+events", tuned),
                    ("bare Celery + one requests GET", http_ref),
                    (f"arq + httpx ({each})", arq_ref),
                ]
                if m is not None
            ]
        )
        verdict(
            f">= {TARGET_RATIO:g}x the bare Celery figure",
            relay.done and ratio >= TARGET_RATIO,
            f"{ratio:.2f}x",
        )


if __name__ == "__main__":
    run_main(main)
