"""The global rate limit under load: 3 worker processes, one destination at "50/second".

Baseline first: the same workers deliver --baseline events to an unlimited destination (what
they can do without the limiter, and its worker CPU per delivery). Then --paced events go to
that unlimited destination one ``produce()`` at a time, 1/limit s apart: the limit's pace
without the limiter, since a request sent alone costs more CPU than one in a burst (see
bench/pacing_floor.py). Then --events are produced at once for the limited one; the receiver
(its own process) stamps every arrival. Reported: the achieved rate over the run (first to last
arrival), the busiest and the emptiest sliding one-second windows, a per-second histogram, how
often deliveries were parked by the limiter (``deferred``, per delivery), worker CPU per
delivery against the unlimited figure and against the paced one (what the limiter itself
adds), duplicates. The paced and the limited figures leave out what the idle workers burn
over their duration. ``produce()`` does not batch: with --batch-size N the paced events still
go one message each, so the paced figure pays a Celery message per delivery, which the burst's
and the limited run's batches share. ``--old-ref REF`` runs the same measurement first with
the workers of an older commit (its files from ``git archive``, same Redis, receiver and
machine): before and after in one run.
Target: achieved rate within 5 % of the limit, no one-second window more than 5 % over it, and
worker CPU per delivery at most 1.2x the unlimited (burst) figure; the paced ratio is
information.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from common import (
    ROOT,
    Receiver,
    add_common_args,
    add_pool_args,
    effective_settings,
    header,
    machine,
    make_events,
    make_producer,
    max_in_any_window,
    new_run_id,
    on_schedule,
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
    worker_cpu_seconds,
    workspace,
    write_destinations,
)

from config.keys import RedisKeys

TOLERANCE = 0.05
CPU_RATIO = 1.2
FREE_APP = "id1111111111"
LIMITED_APP = "id2222222222"


def destinations(base_url: str, limit: int) -> str:
    url = f"{base_url}/pb/(app-id)?id=(event_id)&idfa=(idfa)"
    return f"""
[[destination]]
name = "free"
kind = "templated"
url = "{url}"
[[destination.routes]]
type = "install"
apps = ["{FREE_APP}"]

[[destination]]
name = "limited"
kind = "templated"
url = "{url}"
rate_limit = "{limit}/second"
[[destination.routes]]
type = "install"
apps = ["{LIMITED_APP}"]
"""


def min_in_any_window(times: list[float], width: float = 1.0) -> int:
    """The fewest arrivals in any full window [t, t + width) inside the run (steadiness)."""
    ordered = sorted(times)
    if not ordered or ordered[-1] - ordered[0] < width:
        return len(ordered)
    worst, end = len(ordered), 0
    for start, t in enumerate(ordered):
        if t + width > ordered[-1]:
            break
        while end < len(ordered) and ordered[end] < t + width:
            end += 1
        worst = min(worst, end - start)
    return worst


@dataclass
class LimitedRun:
    """One set of workers (this checkout's or an older commit's): unlimited, then limited."""

    label: str
    baseline_rate: float
    baseline_cpu_ms: float  # worker CPU per delivery, unlimited
    idle_cpu_per_s: float  # what the idle workers burn (mover, heartbeats, event flushes)
    paced: int  # deliveries, unlimited, one produce() per 1/limit s
    paced_seconds: float  # first produce -> last arrival
    paced_cpu_s: float  # worker CPU over the paced phase
    times: list[float]
    done: bool
    seconds: float  # produce -> last arrival
    cpu_s: float  # worker CPU over the limited run
    deferred: int
    duplicates: int

    def busy_cpu_ms(self, cpu_s: float, seconds: float, delivered: int) -> float:
        """Worker CPU per delivery over a phase of ``seconds``, less what the idle workers
        would have burnt meanwhile: the paced and limited phases last events / limit seconds,
        long enough for it to show (the burst is too short for it to matter)."""
        return max(0.0, cpu_s - self.idle_cpu_per_s * seconds) * 1000 / max(1, delivered)


def checkout(ref: str, workdir: Path) -> Path:
    """The tracked files of ``ref`` in a folder of their own (code only: the same venv runs it)."""
    target = workdir / f"code-{ref}"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def measure(
    label: str, cwd: Path, info: Any, receiver: Receiver, path: Path, args: argparse.Namespace
) -> LimitedRun:
    prefix = "bench" + label.replace("-", "")[:8].lower()
    env = relay_env(info.url, path, POSTBACK_RELAY_KEY_PREFIX=prefix,
                    POSTBACK_RELAY_BATCH_SIZE=str(args.batch_size))  # fmt: skip
    keys = RedisKeys(prefix)
    workers = start_relay_workers(
        args.workers, env, args.workdir, pool=args.pool, concurrency=args.concurrency,
        tag=label, cwd=cwd,
    )  # fmt: skip
    # The workers' key prefix: a batch's deliveries are looked up in the producer's ledger.
    producer = make_producer(info.url, path, key_prefix=prefix, batch_size=args.batch_size)
    try:
        receiver.reset()
        free = make_events(args.baseline, "free-" + new_run_id(), app_id=FREE_APP)
        started, cpu = time.monotonic(), worker_cpu_seconds(workers)
        produce_all(producer, free)
        _, ended, got = wait_for_count(receiver.count, args.baseline, 120)
        baseline_rate = got / (ended - started)
        baseline_cpu_ms = (worker_cpu_seconds(workers) - cpu) * 1000 / max(1, got)
        time.sleep(1.0)  # the last acks and events
        idle_from, cpu = time.monotonic(), worker_cpu_seconds(workers)
        time.sleep(2.0)
        idle_cpu_per_s = (worker_cpu_seconds(workers) - cpu) / (time.monotonic() - idle_from)
        receiver.reset()

        paced = make_events(args.paced, "paced-" + new_run_id(), app_id=FREE_APP)
        started, cpu = time.monotonic(), worker_cpu_seconds(workers)
        for event in on_schedule(paced, 1 / args.limit):
            producer.produce(event)  # a message of its own, whatever the batch size
        _, ended, paced_got = wait_for_count(receiver.count, args.paced, 60, poll=0.1)
        paced_seconds, paced_cpu_s = ended - started, worker_cpu_seconds(workers) - cpu
        time.sleep(1.0 if paced else 0.0)  # the last acks and events
        receiver.reset()

        limited = make_events(args.events, "lim-" + new_run_id(), app_id=LIMITED_APP)
        started, cpu = time.monotonic(), worker_cpu_seconds(workers)
        produce_all(producer, limited)
        timeout = args.events / args.limit * 3 + 30
        done, ended, _ = wait_for_count(receiver.count, args.events, timeout, poll=0.1)
        cpu_s = worker_cpu_seconds(workers) - cpu
        dump = receiver.dump()
        deferred = int(info.client.hget(keys.metrics_counters(), "limited|deferred") or 0)
    finally:
        stop_all(workers)
    ids = Counter(parse_qs(urlsplit(t).query)["id"][0] for t in dump["targets"])
    return LimitedRun(
        label, baseline_rate, baseline_cpu_ms, idle_cpu_per_s, paced_got, paced_seconds,
        paced_cpu_s, sorted(dump["times"]), done, ended - started, cpu_s, deferred,
        sum(n - 1 for n in ids.values() if n > 1),
    )  # fmt: skip


def report(run: LimitedRun, args: argparse.Namespace) -> tuple[float, int, float]:
    """Print one run's rows; (achieved rate, busiest window, CPU per delivery vs unlimited)."""
    times = run.times
    delivered = max(1, len(times))
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    achieved = (len(times) - 1) / span
    busiest, busiest_at = max_in_any_window(times)
    per_second = Counter(int(t - times[0]) for t in times)
    cpu_ms = run.cpu_s * 1000 / delivered
    busy_cpu_ms = run.busy_cpu_ms(run.cpu_s, run.seconds, delivered)
    ratio = busy_cpu_ms / run.baseline_cpu_ms
    paced_ms = run.busy_cpu_ms(run.paced_cpu_s, run.paced_seconds, run.paced)
    print(f"  --- {run.label} ---")
    row(
        "baseline: same workers, no limit",
        f"{run.baseline_rate:,.0f} deliveries/s",
        f"{args.baseline:,} events; {run.baseline_cpu_ms:.2f} ms worker CPU per delivery",
    )
    if args.paced:
        row(
            "paced, no limit (same pace as the limit)",
            f"{run.paced:,} deliveries",
            f"{paced_ms:.2f} ms worker CPU per delivery without the idle workers' CPU, "
            f"{paced_ms / run.baseline_cpu_ms:.2f}x the burst; one produce() per "
            f"{1000 / args.limit:g} ms, {run.paced_seconds:.1f} s"
            + ("" if run.paced >= args.paced else f" - INCOMPLETE ({args.paced:,} produced)"),
        )
    row(
        "achieved rate (first -> last arrival)",
        f"{achieved:,.1f} /s",
        f"{len(times):,} of {args.events:,} in {span:.2f} s; "
        f"{achieved / args.limit - 1:+.1%} vs the limit" + ("" if run.done else " - INCOMPLETE"),
    )
    row(
        "partner's busiest sliding 1 s window",
        f"{busiest:,} requests",
        f"{busiest / args.limit - 1:+.1%} vs the limit of {args.limit}, "
        f"at +{busiest_at - times[0]:.2f} s",
    )
    row("emptiest full 1 s window", f"{min_in_any_window(times):,} requests")
    row(
        "per second since the first arrival",
        " ".join(str(per_second[s]) for s in range(int(span) + 1)),
    )
    row(
        "deferrals (parked by the limiter)",
        f"{run.deferred:,}",
        f"{run.deferred / delivered:.2f} per delivery; each costs a task run",
    )
    row(
        "worker CPU per delivery, limited",
        f"{cpu_ms:.2f} ms",
        f"{busy_cpu_ms:.2f} ms without the idle workers' "
        f"{run.idle_cpu_per_s * 1000:.0f} ms/s: {ratio:.2f}x the unlimited "
        f"{run.baseline_cpu_ms:.2f} ms",
    )
    if args.paced:
        row(
            "limited vs paced, no limit",
            f"{busy_cpu_ms / paced_ms if paced_ms else float('nan'):.2f}x",
            "what the limiter adds; the rest is what sending one request at a time costs",
        )
    row("duplicate requests", f"{run.duplicates:,}")
    return achieved, busiest, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=50, help="per second")
    parser.add_argument("--events", type=int, default=1_500)
    parser.add_argument("--baseline", type=int, default=2_000, help="events, unlimited")
    parser.add_argument(
        "--paced", type=int, default=500, help="events, unlimited, one every 1/limit s (0: none)"
    )
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument(
        "--batch-size", type=int, default=1, help="POSTBACK_RELAY_BATCH_SIZE (producer and workers)"
    )
    parser.add_argument(
        "--old-ref",
        help="also measure the workers of this commit first (e.g. the yes/no limiter's: 5100cfd)",
    )
    add_pool_args(parser)
    add_common_args(parser)
    args = parser.parse_args()
    args.pool, args.concurrency = pool_args(args)

    with workspace(args.keep) as workdir, redis_server(workdir, args.appendfsync) as info:
        args.workdir = workdir
        receiver = Receiver(workdir, targets=True)
        try:
            path = write_destinations(workdir, destinations(receiver.url, args.limit))
            settings = effective_settings(relay_env(info.url, path))
            header(
                f"rate_limit: {args.workers} worker processes, one destination at "
                f'"{args.limit}/second"',
                machine=machine(),
                redis=info.describe(),
                workers=f"{args.workers} x {args.pool}, concurrency {args.concurrency}; "
                f"delay_mover_interval={settings.delay_mover_interval:g} s, "
                f"rate_limit_max_sleep={settings.rate_limit_max_sleep:g} s, "
                f"batch size {args.batch_size}",
                events=f"{args.events:,} produced at once (ideal run: "
                f"{args.events / args.limit:.1f} s)",
                paced=f"{args.paced:,} to the unlimited destination, one produce() every "
                f"{1000 / args.limit:g} ms (a message each, whatever the batch size)",
            )
            runs = []
            if args.old_ref:
                runs.append(measure(f"old-{args.old_ref}", checkout(args.old_ref, workdir),
                                    info, receiver, path, args))  # fmt: skip
            runs.append(measure("this-checkout", ROOT, info, receiver, path, args))
        finally:
            receiver.stop()

        results = [report(run, args) for run in runs]
        achieved, busiest, ratio = results[-1]
        met = (
            runs[-1].done
            and abs(achieved / args.limit - 1) <= TOLERANCE
            and busiest <= args.limit * (1 + TOLERANCE)
            and ratio <= CPU_RATIO
        )
        verdict(
            f"achieved within {TOLERANCE:.0%} of {args.limit}/s, no 1 s window above "
            f"{args.limit * (1 + TOLERANCE):.0f}, worker CPU per delivery <= {CPU_RATIO}x the "
            "unlimited figure",
            met,
            f"{achieved:,.1f}/s, busiest window {busiest}, CPU {ratio:.2f}x",
        )


if __name__ == "__main__":
    run_main(main)
