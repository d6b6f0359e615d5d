"""Worker memory over many deliveries: RSS samples, the slope, and the peak.

One ``postback-relay worker`` process (the default pool) delivers N postbacks to a receiver that
answers at once; its RSS is sampled every --sample-every deliveries and its peak is the
kernel's own VmHWM. The queue is topped up as it drains (never more than a few thousand
messages waiting), so queue size does not grow with N.

Baseline, in the same run: the worker's own RSS after a warm-up of 500 deliveries (sample 0).
With --bare-baseline, one bare Celery worker (same pool and concurrency) also runs N no-op
tasks in parallel at the same pace, sampled the same way (slower: the two share the CPU).

The slope is a least-squares fit of RSS against deliveries: over all samples, and over the
second half of the run (steady state: start-up allocations, pools and caches have filled).
The brief sets no number; judged here: the second-half slope is below 1 MB per 10,000
deliveries. One worker process delivers ~250/s on the 2-core machine, so the default 20,000
takes ~80 s; --deliveries 100000 for the full run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from common import (
    Receiver,
    WorkerProc,
    add_common_args,
    add_pool_args,
    bare_enqueue,
    header,
    machine,
    make_events,
    make_producer,
    new_run_id,
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

TARGET_MB_PER_10K = 1.0
CHUNK = 1_000
MAX_WAITING = 3_000


@dataclass
class Series:
    worker: WorkerProc
    samples: list[tuple[int, float]] = field(default_factory=list)  # (deliveries, RSS MB)
    next_at: int = 0
    produced: int = 0

    def sample(self, done: int) -> None:
        self.samples.append((done, self.worker.rss_bytes(children=False) / 2**20))

    def slope_per_10k(self, second_half: bool = False) -> float:
        points = self.samples
        if second_half:
            points = [p for p in points if p[0] >= points[-1][0] / 2]
        if len(points) < 2:
            return float("nan")
        n = len(points)
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in points)
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
        return sxy / sxx * 10_000 if sxx else float("nan")

    def describe(self) -> str:
        return " ".join(f"{d // 1000}k:{mb:.1f}" for d, mb in self.samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deliveries", type=int, default=100_000)
    parser.add_argument("--sample-every", type=int, default=None, help="default N/10")
    add_pool_args(parser)
    parser.add_argument(
        "--bare-baseline", action="store_true", help="also run a bare Celery worker alongside"
    )
    add_common_args(parser)
    args = parser.parse_args()
    args.pool, args.concurrency = pool_args(args)
    total = args.deliveries
    step = args.sample_every or max(1_000, total // 10)

    from bench import bare_celery

    with workspace(args.keep) as workdir, redis_server(workdir, args.appendfsync) as info:
        receiver = Receiver(workdir)
        try:
            path = write_destinations(workdir, templated_toml(receiver.url))
            header(
                "memory: worker RSS over many deliveries",
                machine=machine(),
                redis=info.describe(),
                worker=f"1 process, {args.pool}, concurrency {args.concurrency}",
                deliveries=f"{total:,}, sampled every {step:,}",
            )
            producer = make_producer(info.url, path)
            relay_w = start_relay_workers(
                1, relay_env(info.url, path), workdir, pool=args.pool, concurrency=args.concurrency
            )
            bare_w = (
                start_bare_workers(
                    1, info.url, workdir, pool=args.pool, concurrency=args.concurrency
                )
                if args.bare_baseline
                else []
            )
            try:
                run_id = new_run_id()
                warm = 500
                produce_all(producer, make_events(warm, "warm-" + run_id))
                info.client.set(bare_celery.DONE_KEY, 0)
                if bare_w:
                    bare_enqueue(info.client, bare_celery.TASK,
                                 [(e,) for e in make_events(warm, "bwarm-" + run_id)])  # fmt: skip
                    wait_for_count(lambda: int(info.client.get(bare_celery.DONE_KEY) or 0),
                                   warm, 60)  # fmt: skip
                wait_for_count(receiver.count, warm, 60)
                receiver.reset()
                info.client.set(bare_celery.DONE_KEY, 0)

                relay = Series(relay_w[0])
                bare = Series(bare_w[0]) if bare_w else None
                for series in (relay, bare):
                    if series is not None:
                        series.sample(0)
                        series.next_at = step
                started = time.monotonic()
                bare_done = 0
                while True:
                    relay_done = receiver.count()
                    if bare is not None:
                        bare_done = int(info.client.get(bare_celery.DONE_KEY) or 0)
                    if relay.produced < total and relay.produced - relay_done < MAX_WAITING:
                        n = min(CHUNK, total - relay.produced)
                        produce_all(producer, make_events(n, run_id, start=relay.produced))
                        relay.produced += n
                    # the baseline keeps pace with the relay worker, never ahead of it
                    if (
                        bare is not None
                        and bare.produced < min(total, relay_done + MAX_WAITING)
                        and bare.produced - bare_done < MAX_WAITING
                    ):
                        n = min(CHUNK, total - bare.produced)
                        events = make_events(n, "b" + run_id, start=bare.produced)
                        bare_enqueue(info.client, bare_celery.TASK, [(e,) for e in events])
                        bare.produced += n
                    for series, done in ((relay, relay_done), (bare, bare_done)):
                        if series is not None and done >= series.next_at:
                            series.sample(done)
                            series.next_at += step
                    if relay_done >= total and (bare is None or bare_done >= total):
                        break
                    if time.monotonic() - started > total / 20 + 120:
                        raise RuntimeError(f"stalled at {relay_done:,} / {bare_done:,}")
                    time.sleep(0.05)
                seconds = time.monotonic() - started
                relay_peak = relay.worker.peak_rss_bytes() / 2**20
                bare_peak = bare.worker.peak_rss_bytes() / 2**20 if bare is not None else 0.0
            finally:
                stop_all([*relay_w, *bare_w])
        finally:
            receiver.stop()

        row("run", f"{total:,} deliveries in {seconds:.1f} s", f"{total / seconds:,.0f} /s")
        row("RSS samples (deliveries:MB)", relay.describe())
        row("baseline: RSS after warm-up (sample 0)", f"{relay.samples[0][1]:,.1f} MB")
        row(
            "peak RSS (VmHWM)",
            f"{relay_peak:,.1f} MB",
            f"{relay_peak - relay.samples[0][1]:+.1f} MB over the baseline",
        )
        row(
            "slope, MB per 10k deliveries",
            f"{relay.slope_per_10k(second_half=True):+.2f} (second half)",
            f"{relay.slope_per_10k():+.2f} over all samples",
        )
        if bare is not None:
            row("bare Celery RSS samples", bare.describe())
            row(
                "bare Celery peak RSS (VmHWM), slope",
                f"{bare_peak:,.1f} MB",
                f"{bare.slope_per_10k(second_half=True):+.2f} MB per 10k tasks (second half), "
                f"{bare.slope_per_10k():+.2f} over all",
            )
        slope = relay.slope_per_10k(second_half=True)
        verdict(
            f"(none in the brief) RSS grows < {TARGET_MB_PER_10K:g} MB per 10,000 deliveries "
            "in the second half of the run",
            slope < TARGET_MB_PER_10K,
            f"{slope:+.2f} MB per 10k",
        )


if __name__ == "__main__":
    run_main(main)
