"""The global rate limit under load: 3 worker processes, one destination at "200/second".

Baseline first: the same workers deliver --baseline events to an unlimited destination (what
they can do without the limiter). Then --events are produced at once for the limited one; the
receiver (its own process) stamps every arrival. Reported: the achieved rate over the run
(first to last arrival), the busiest and the emptiest sliding one-second windows, a per-second
histogram, how often deliveries were parked by the limiter (``deferred``), and duplicates.
Target: achieved rate within 5 % of the limit, and no one-second window more than 5 % over it.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from urllib.parse import parse_qs, urlsplit

from common import (
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

TOLERANCE = 0.05
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=200, help="per second")
    parser.add_argument("--events", type=int, default=3_000)
    parser.add_argument("--baseline", type=int, default=2_000, help="events, unlimited")
    parser.add_argument("--workers", type=int, default=3)
    add_pool_args(parser)
    add_common_args(parser)
    args = parser.parse_args()
    args.pool, args.concurrency = pool_args(args)
    keys = RedisKeys()

    with workspace(args.keep) as workdir, redis_server(workdir, args.appendfsync) as info:
        receiver = Receiver(workdir, targets=True)
        try:
            path = write_destinations(workdir, destinations(receiver.url, args.limit))
            env = relay_env(info.url, path)
            settings = effective_settings(env)
            header(
                f"rate_limit: {args.workers} worker processes, one destination at "
                f'"{args.limit}/second"',
                machine=machine(),
                redis=info.describe(),
                workers=f"{args.workers} x {args.pool}, concurrency {args.concurrency}; "
                f"delay_mover_interval={settings.delay_mover_interval:g} s",
                events=f"{args.events:,} produced at once (ideal run: "
                f"{args.events / args.limit:.1f} s)",
            )
            producer = make_producer(info.url, path)
            workers = start_relay_workers(
                args.workers, env, workdir, pool=args.pool, concurrency=args.concurrency
            )
            try:
                free = make_events(args.baseline, "free-" + new_run_id(), app_id=FREE_APP)
                started = time.monotonic()
                produce_all(producer, free)
                _, ended, got = wait_for_count(receiver.count, args.baseline, 120)
                baseline_rate = got / (ended - started)
                receiver.reset()

                limited = make_events(args.events, "lim-" + new_run_id(), app_id=LIMITED_APP)
                produce_all(producer, limited)
                timeout = args.events / args.limit * 3 + 30
                done, _, got = wait_for_count(receiver.count, args.events, timeout, poll=0.1)
                dump = receiver.dump()
                counters = {
                    k.decode(): int(v)
                    for k, v in info.client.hgetall(keys.metrics_counters()).items()
                }
            finally:
                stop_all(workers)
        finally:
            receiver.stop()

        times = sorted(dump["times"])
        ids = Counter(parse_qs(urlsplit(t).query)["id"][0] for t in dump["targets"])
        duplicates = sum(n - 1 for n in ids.values() if n > 1)
        span = times[-1] - times[0] if len(times) > 1 else float("nan")
        achieved = (len(times) - 1) / span
        busiest, busiest_at = max_in_any_window(times)
        emptiest = min_in_any_window(times)
        per_second = Counter(int(t - times[0]) for t in times)
        deferred = counters.get("limited|deferred", 0)

        row("baseline: same workers, no limit", f"{baseline_rate:,.0f} deliveries/s",
            f"{args.baseline:,} events")  # fmt: skip
        row(
            "achieved rate (first -> last arrival)",
            f"{achieved:,.1f} /s",
            f"{len(times):,} of {args.events:,} in {span:.2f} s; "
            f"{achieved / args.limit - 1:+.1%} vs the limit" + ("" if done else " - INCOMPLETE"),
        )
        row(
            "busiest sliding 1 s window",
            f"{busiest:,} requests",
            f"{busiest / args.limit - 1:+.1%} vs the limit, at +{busiest_at - times[0]:.2f} s",
        )
        row("emptiest full 1 s window", f"{emptiest:,} requests")
        row(
            "per second since the first arrival",
            " ".join(str(per_second[s]) for s in range(int(span) + 1)),
        )
        row(
            "deliveries parked by the limiter",
            f"{deferred:,}",
            f"{deferred / max(1, args.events):.1f} per delivery; each costs a task run",
        )
        row("duplicate requests", f"{duplicates:,}")
        met = (
            done
            and abs(achieved / args.limit - 1) <= TOLERANCE
            and busiest <= args.limit * (1 + TOLERANCE)
        )
        verdict(
            f"achieved within {TOLERANCE:.0%} of {args.limit}/s and no 1 s window above "
            f"{args.limit * (1 + TOLERANCE):.0f}",
            met,
            f"{achieved:,.1f}/s, busiest window {busiest}",
        )


if __name__ == "__main__":
    run_main(main)
