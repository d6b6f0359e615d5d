"""What one request costs sent alone against sent in a burst: the floor under a paced sender.

One process, gevent-patched as a gevent worker is, does each operation --ops times as a burst
(--greenlets at once) and then paced (one greenlet every --gap seconds, on a monotonic
schedule, so each finds the process idle), and prints the process CPU (``getrusage``) per
operation both ways and paced / burst. The operations, each a part of every delivery:
  - one urllib3 GET to bench/receiver.py (its own process, answering at once) over a
    keep-alive pool;
  - the same GET as a delivery makes it: ``workers.delivery.sender.Sender`` (bounded read,
    charset, masking, the adapter's classification), on urllib3's pools (the threads pool's
    and proxied requests' client) and on geventhttpclient's (a gevent worker's since 0.4.2);
  - nothing: a greenlet spawned and ended, which paced is what waking up alone costs;
  - one redis-py pipeline of 10 HINCRBYs (the shape of a delivery's finish step) to the
    bench's Redis (also its own process).
Neither the receiver's nor Redis' CPU is counted; the sleeping process' own CPU over a paced
run is left out. A worker under a rate limit sends at the limit's pace whatever the limiter
does: this is what that pace costs by itself (bench/rate_limit.py's "paced, no limit" row).
No target.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # as workers/gevent_worker.py: before socket, threading, redis, urllib3

import argparse  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import gevent.pool  # noqa: E402
import redis  # noqa: E402
import urllib3  # noqa: E402
from common import (  # noqa: E402
    Receiver,
    header,
    machine,
    on_schedule,
    redis_server,
    row,
    run_main,
    workspace,
)
from http_sender import Probe  # noqa: E402

from workers.delivery.client import http_client  # noqa: E402
from workers.delivery.sender import Sender  # noqa: E402
from workers.kinds.base import OutgoingRequest  # noqa: E402

PIPELINE_COMMANDS = 10


def cpu_seconds() -> float:
    """User + system CPU of this process (every thread: gevent's resolver pool too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def burst(op: Callable[[], object], count: int, greenlets: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``count`` ops, ``greenlets`` of them at once."""
    pool = gevent.pool.Pool(greenlets)
    cpu, wall = cpu_seconds(), time.monotonic()
    for _ in range(count):
        pool.spawn(op)  # waits for a free slot
    pool.join(raise_error=True)
    return cpu_seconds() - cpu, time.monotonic() - wall


def paced(op: Callable[[], object], count: int, gap: float) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``count`` ops, each in its own greenlet, ``gap`` apart."""
    group = gevent.pool.Group()
    cpu, wall = cpu_seconds(), time.monotonic()
    for _ in on_schedule(range(count), gap):
        group.spawn(op)
    group.join(raise_error=True)
    return cpu_seconds() - cpu, time.monotonic() - wall


def idle_cpu_per_s(seconds: float = 2.0) -> float:
    """What this process burns asleep (the hub with its connections open)."""
    cpu, wall = cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds() - cpu) / (time.monotonic() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=500, help="per operation and way")
    parser.add_argument("--greenlets", type=int, default=32, help="at once in the burst")
    parser.add_argument(
        "--gap",
        default="0.02",
        help="seconds between paced ops, comma-separated for several (0.02: 50/s)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the receiver's log")
    args = parser.parse_args()
    gaps = [float(g) for g in args.gap.split(",")]

    with workspace(args.keep) as workdir, redis_server(workdir) as info:
        receiver = Receiver(workdir)
        try:
            url = f"{receiver.url}/pb?idfa=6D92078A-8246-4BA4-AE5B-76104861E7DC&event=install"
            http = urllib3.PoolManager(num_pools=4, maxsize=args.greenlets)
            timeout = urllib3.Timeout(connect=5.0, read=10.0, total=15.0)
            client = redis.Redis.from_url(info.url)
            key = "bench:pacing_floor"

            def get() -> object:
                answer = http.request("GET", url, timeout=timeout, retries=False, redirect=False)
                assert answer.status == 200, answer.status
                return answer

            def pipeline() -> object:
                with client.pipeline(transaction=False) as pipe:
                    for i in range(PIPELINE_COMMANDS):
                        pipe.hincrby(key, f"field-{i}", 1)
                    return pipe.execute()

            request = OutgoingRequest("GET", url, url, {"X-Idempotency-Key": "bench"})
            adapter, in_flight = Probe(), args.greenlets
            settings = SimpleNamespace(
                http_user_agent="postback-relay-bench", concurrency=in_flight,
                deliveries_in_flight=in_flight,
            )  # fmt: skip

            def sends(green: bool) -> Callable[[], object]:
                sender = Sender(http_client(settings, green=green))  # type: ignore[arg-type]

                def send() -> object:
                    outcome, _ = sender.send(adapter, request)
                    assert getattr(outcome, "status", None) == 200, outcome
                    return outcome

                return send

            ops = {
                "GET (urllib3)": get,
                "GET (Sender, urllib3)": sends(green=False),
                "GET (Sender, geventhttpclient)": sends(green=True),
            }
            ops[f"pipeline of {PIPELINE_COMMANDS} (redis-py)"] = pipeline
            ops["nothing (a greenlet's wake-up alone)"] = lambda: None
            header(
                "pacing_floor: CPU per operation, alone vs in a burst (one gevent process)",
                machine=machine(),
                redis=info.describe(),
                partner=f"bench/receiver.py at {receiver.url}, answering at once, keep-alive",
                ops=f"{args.ops:,} per operation: a burst of {args.greenlets} greenlets at once, "
                f"then one greenlet every {', '.join(f'{g * 1000:g}' for g in gaps)} ms",
            )
            for op in ops.values():  # warm-up: the connections open, the code paths hot
                burst(op, 4 * args.greenlets, args.greenlets)
            idle = idle_cpu_per_s()
            row("idle process (asleep, connections open)", f"{idle * 1000:.2f} ms CPU/s")
            for name, op in ops.items():
                cpu, wall = burst(op, args.ops, args.greenlets)
                burst_ms = cpu * 1000 / args.ops
                row(
                    f"{name}: burst of {args.greenlets}",
                    f"{burst_ms:.3f} ms CPU per op",
                    f"{args.ops:,} in {wall:.2f} s: {args.ops / wall:,.0f}/s",
                )
                for gap in gaps:
                    cpu, wall = paced(op, args.ops, gap)
                    paced_ms = max(0.0, cpu - idle * wall) * 1000 / args.ops
                    row(
                        f"{name}: one every {gap * 1000:g} ms",
                        f"{paced_ms:.3f} ms CPU per op",
                        f"{paced_ms / burst_ms:.2f}x the burst; {args.ops:,} in {wall:.1f} s",
                    )
            row("requests the receiver counted", f"{receiver.count():,}")
            client.close()
        finally:
            receiver.stop()


if __name__ == "__main__":
    run_main(main)
