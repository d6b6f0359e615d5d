"""What an ack costs a gevent worker: written at once (one round trip each, as kombu does) or
held and written together (workers/broker/transport.py ``QoS``: by the ack that finds the oldest
held ``ACK_WRITE_INTERVAL`` s, and by the worker's timer every ``IDLE_ACK_WRITE_INTERVAL`` s).

One process, gevent-patched as a gevent worker is, takes --acks messages through our kombu
transport and acks them from greenlets one every --gap seconds (a rate-limited worker's pace:
bench/rate_limit.py's three workers at 50/s ack one each every 60 ms), each way. It prints the
process CPU (``getrusage``) per ack beyond what greenlets doing nothing cost at the same pace
(waking up alone every 20 ms costs a gevent process ~0.4 ms by itself), and held / at once.
Redis' CPU is not counted. In bench/rate_limit.py the acks are a few per cent of a delivery's
CPU, within that benchmark's run-to-run spread. No target.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # as workers/gevent_worker.py: before socket, threading, redis

import argparse  # noqa: E402
import resource  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
from common import header, machine, on_schedule, redis_server, row, run_main, workspace  # noqa: E402
from kombu import Connection  # noqa: E402

from workers.broker.transport import ACK_WRITE_INTERVAL, IDLE_ACK_WRITE_INTERVAL  # noqa: E402
from workers.redis_clients import TRANSPORT  # noqa: E402

QUEUE = "bench.acks"


def cpu_seconds() -> float:
    """User + system CPU of this process (not pacing_floor's: that imports the HTTP client)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def paced(calls: Iterable[Callable[[], None]], gap: float) -> float:
    """CPU seconds for running each of ``calls`` in a greenlet of its own, ``gap`` s apart."""
    group = gevent.pool.Group()
    cpu = cpu_seconds()
    for call in on_schedule(calls, gap):
        group.spawn(call)
    group.join(raise_error=True)
    return cpu_seconds() - cpu


def acked(connection: Connection, count: int, gap: float, held: bool) -> float:
    """CPU seconds for acking ``count`` messages, one every ``gap`` s, each in its greenlet."""
    queue = connection.SimpleQueue(QUEUE)
    for i in range(count):
        queue.put({"n": i})
    messages = iter([queue.get(timeout=5) for _ in range(count)])
    transport = connection.transport

    def ack() -> None:
        next(messages).ack()
        if not held:
            transport.write_held_acks()  # this ack alone, at once: the shape of kombu's own

    def write_every_interval() -> None:  # what the worker's timer does (workers/broker/acks.py)
        while True:
            gevent.sleep(IDLE_ACK_WRITE_INTERVAL)
            transport.write_held_acks()

    writer = gevent.spawn(write_every_interval)
    cpu = cpu_seconds()
    paced((ack for _ in range(count)), gap)
    transport.write_held_acks()
    cpu = cpu_seconds() - cpu
    writer.kill()
    channel = connection.default_channel
    assert channel.client.hlen(channel.unacked_key) == 0, "acks left unwritten"
    queue.close()
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--acks", type=int, default=500, help="per way and pace")
    parser.add_argument(
        "--gap", default="0.02,0.06", help="seconds between acks, comma-separated for several"
    )
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    gaps = [float(g) for g in args.gap.split(",")]

    with workspace(args.keep) as workdir, redis_server(workdir) as info:
        header(
            "acks: CPU per ack, written at once vs held (one gevent process)",
            machine=machine(),
            redis=info.describe(),
            acks=f"{args.acks:,} per way, one every {', '.join(f'{g * 1000:g}' for g in gaps)} "
            f"ms; held acks written after {ACK_WRITE_INTERVAL} s by the next ack, and every "
            f"{IDLE_ACK_WRITE_INTERVAL} s by a timer",
        )
        with Connection(info.url, transport=TRANSPORT) as connection:
            acked(connection, 50, 0.0, held=False)  # warm-up: connections open, code paths hot
            for gap in gaps:
                pace = f"one every {gap * 1000:g} ms"
                floor = paced((lambda: None for _ in range(args.acks)), gap)
                row(
                    f"{pace}: a greenlet doing nothing",
                    f"{floor * 1e6 / args.acks:.0f} us CPU each",
                    "left out of the figures below",
                )
                figures = {
                    held: (acked(connection, args.acks, gap, held) - floor) * 1e6 / args.acks
                    for held in (False, True)
                }
                row(f"{pace}: written at once", f"{figures[False]:.0f} us CPU per ack")
                row(
                    f"{pace}: held",
                    f"{figures[True]:.0f} us CPU per ack",
                    f"{figures[True] / figures[False]:.2f}x at once",
                )


if __name__ == "__main__":
    run_main(main)
