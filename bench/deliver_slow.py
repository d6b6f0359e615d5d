"""Deliveries/s from ONE worker process when the partner answers after 100 ms, per pool.

For each configuration (default: threads x64, threads x128, gevent x64, gevent x128, prefork x8,
and gevent x128 with the pool and concurrency given through POSTBACK_RELAY_WORKER_POOL and
POSTBACK_RELAY_WORKER_CONCURRENCY instead of options, as compose and the Procfile do) one
``postback-relay worker`` process is started, a backlog larger than the ideal rate can drain is
produced, and the steady rate is measured over a fixed window (after a warm-up window) from
the receiver's own count. The baseline is the ideal bound: concurrency / partner latency.
Target: >= 500 deliveries/s per worker process.

A reference for the best configuration: bare Celery (bench/bare_celery.py) with the same pool
and concurrency in one process, whose task makes one pooled ``requests`` GET to the same slow
receiver: what a Celery worker that does nothing but the HTTP request reaches on this machine.
And another system a user could choose: arq + httpx (bench/arq_reference.py) in one process
with max_jobs = that concurrency, measured over the same steady window by the same code as
postback-relay (``measure_window``); skipped, with the reason, when the ``bench`` dependency
group is not installed (bench/README.md). A table ends the output: deliveries/s, worker CPU
per delivery and both as ratios to the best postback-relay configuration.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    Receiver,
    RedisInfo,
    WorkerProc,
    add_arq_args,
    add_common_args,
    comparison_table,
    header,
    log_warning_count,
    machine,
    make_events,
    make_producer,
    measure_bare,
    new_run_id,
    produce_all,
    redis_server,
    relay_env,
    row,
    run_main,
    start_arq_reference,
    start_relay_workers,
    stop_all,
    templated_toml,
    verdict,
    worker_cpu_seconds,
    workspace,
    write_destinations,
)

TARGET = 500.0
POOL_FULL = "Connection pool is full"


@dataclass
class Config:
    pool: str
    concurrency: int
    via_env: bool = False

    @property
    def label(self) -> str:
        how = " (from POSTBACK_RELAY_WORKER_*)" if self.via_env else ""
        return f"{self.pool} x{self.concurrency}{how}"


@dataclass
class Outcome:
    config: Config
    rate: float
    ideal: float
    rss_mb: float
    pool_full: int
    processes: int
    cpu_ms: float  # worker CPU (user+sys, pool children included) per delivery in the window


def parse_configs(text: str) -> list[Config]:
    configs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        configs.append(Config(parts[0], int(parts[1]), len(parts) > 2 and parts[2] == "env"))
    return configs


@dataclass
class Window:
    rate: float  # deliveries/s the receiver counted in the window
    cpu_ms: float  # worker CPU (user+sys, pool children included) per delivery in the window


def measure_window(
    receiver: Receiver,
    workers: Sequence[WorkerProc],
    send: Callable[[Sequence[dict[str, Any]]], object],
    backlog: int,
    args: argparse.Namespace,
) -> Window:
    """``send`` a backlog, wait out the warm-up, then count and take the CPU over the window:
    postback-relay and the arq reference measured by the same code."""
    send(make_events(backlog, new_run_id()))
    time.sleep(args.warmup)
    first_count, first_at = receiver.count(), time.monotonic()
    first_cpu = worker_cpu_seconds(workers)
    time.sleep(args.window)
    last_count, last_at = receiver.count(), time.monotonic()
    cpu = worker_cpu_seconds(workers) - first_cpu
    delivered = last_count - first_count
    return Window(delivered / (last_at - first_at), cpu * 1000 / max(1, delivered))


def backlog_for(concurrency: int, args: argparse.Namespace) -> int:
    """Enough that the queue never runs dry at the ideal rate during warm-up + window."""
    return int(concurrency / args.latency * (args.warmup + args.window) * 1.3) + concurrency


def run_config(
    config: Config, info: RedisInfo, receiver: Receiver, path: Path, args: argparse.Namespace
) -> Outcome:
    workdir = path.parent
    extra = (
        {
            "POSTBACK_RELAY_WORKER_POOL": config.pool,
            "POSTBACK_RELAY_WORKER_CONCURRENCY": str(config.concurrency),
        }
        if config.via_env
        else {}
    )
    extra["POSTBACK_RELAY_BATCH_SIZE"] = str(args.batch_size)
    env = relay_env(info.url, path, **extra)
    # Each task holds a whole batch, so a process has concurrency x batch size requests out.
    in_flight = config.concurrency * args.batch_size
    ideal = in_flight / args.latency
    info.client.flushdb()
    receiver.reset()
    producer = make_producer(info.url, path, batch_size=args.batch_size)
    tag = f"{config.pool}{config.concurrency}{'env' if config.via_env else ''}"
    workers = start_relay_workers(
        1,
        env,
        workdir,
        pool=None if config.via_env else config.pool,
        concurrency=None if config.via_env else config.concurrency,
        tag=tag,
    )
    try:
        window = measure_window(
            receiver,
            workers,
            lambda events: produce_all(producer, events),
            args.backlog or backlog_for(in_flight, args),
            args,
        )
        rss = workers[0].pss_bytes() / 2**20
        processes = 1 + len(workers[0].process().children(recursive=True))
        pool_full = log_warning_count(workers, POOL_FULL)
    finally:
        stop_all(workers)
    receiver.reset()
    return Outcome(config, window.rate, ideal, rss, pool_full, processes, window.cpu_ms)


def run_arq(
    concurrency: int, info: RedisInfo, receiver: Receiver, workdir: Path, args: argparse.Namespace
) -> Window | None:
    """The arq + httpx reference in one process, ``max_jobs`` = ``concurrency`` (None: skipped)."""
    info.client.flushdb()  # the last configuration's backlog
    receiver.reset()
    arq = start_arq_reference(
        args, info.url, workdir, receiver.url, workers=1, concurrency=concurrency
    )
    if arq is None:
        return None
    with arq:
        window = measure_window(
            receiver, arq.workers, arq.enqueue, backlog_for(concurrency, args), args
        )
    receiver.reset()
    return window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs",
        default="gevent:64,gevent:128,threads:64,threads:128,prefork:8,gevent:64:env",
        help="pool:concurrency[:env],... (env: pool and concurrency from the environment)",
    )
    parser.add_argument("--latency", type=float, default=0.1, help="partner answer delay (s)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the window")
    parser.add_argument("--window", type=float, default=4.0, help="seconds measured")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="POSTBACK_RELAY_BATCH_SIZE (producer and worker)"
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="events queued before the window (default: enough for the ideal rate; with large "
        "batches the ideal is far above what one process reaches, so give a smaller one)",
    )
    add_arq_args(parser)
    add_common_args(parser)
    args = parser.parse_args()
    configs = parse_configs(args.configs)

    with workspace(args.keep) as workdir, redis_server(workdir, args.appendfsync) as info:
        receiver = Receiver(workdir, delay=args.latency)
        try:
            path = write_destinations(workdir, templated_toml(receiver.url))
            header(
                f"deliver_slow: one worker process, partner answers after "
                f"{args.latency * 1000:.0f} ms",
                machine=machine(),
                redis=info.describe(),
                measure=f"steady rate over {args.window:g} s after {args.warmup:g} s of warm-up, "
                "with a backlog the ideal rate cannot drain",
            )
            outcomes = [run_config(c, info, receiver, path, args) for c in configs]
            best = max(outcomes, key=lambda o: o.rate)
            bare = measure_bare(
                info,
                workdir,
                max(1_000, int(best.rate * args.window * 2)),
                workers=1,
                pool=best.config.pool,
                concurrency=best.config.concurrency,
                http_url=receiver.url,
            )
            arq = run_arq(best.config.concurrency, info, receiver, workdir, args)
        finally:
            receiver.stop()

        for o in outcomes:
            row(
                o.config.label,
                f"{o.rate:,.0f} /s",
                f"baseline (ideal concurrency/latency) {o.ideal:,.0f} /s = "
                f"{o.rate / o.ideal:.0%} of it; worker CPU {o.cpu_ms:.2f} ms per delivery; "
                f"{o.processes} process(es), PSS {o.rss_mb:,.0f} MB"
                + (f"; {o.pool_full:,} 'Connection pool is full' warnings" if o.pool_full else ""),
            )
        row(
            f"reference: bare Celery + GET, {best.config.pool} x{best.config.concurrency}",
            f"{bare.per_second:,.0f} /s",
            f"{bare.count:,} in {bare.seconds:.2f} s; worker CPU {bare.extra['cpu_ms']:.2f} ms "
            "per task; one process, the same slow receiver",
        )
        one = f"one process x{best.config.concurrency}"
        comparison_table(
            [(f"postback-relay ({best.config.label})", best.rate, best.cpu_ms)]
            + [(f"bare Celery + one requests GET ({one})", bare.per_second, bare.extra["cpu_ms"])]
            + ([] if arq is None else [(f"arq + httpx ({one})", arq.rate, arq.cpu_ms)])
        )
        print(f"  choose: {best.config.label}")
        print(
            "  why: a delivery mostly waits for the partner, so a process needs as many requests "
            f"in flight as rate x latency ({TARGET:.0f}/s x {args.latency * 1000:.0f} ms = "
            f"{TARGET * args.latency:.0f}). Prefork needs a child process per request in "
            "flight; threads and gevent hold them in one process, where the ceiling is the "
            f"CPU per delivery under one GIL: {best.config.label} spends {best.cpu_ms:.2f} ms, "
            f"so at most ~{1000 / best.cpu_ms:,.0f}/s per process on this machine."
        )
        verdict(
            f">= {TARGET:.0f} deliveries/s per worker process",
            best.rate >= TARGET,
            f"best {best.rate:,.0f} /s ({best.config.label})",
        )


if __name__ == "__main__":
    run_main(main)
